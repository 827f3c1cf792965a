//! The bundle's tokenizer (`tokenizer.json`, loaded with the `tokenizers` crate) and chat
//! template rendering.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// One turn of a conversation, as chat templates take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A turn with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage::new("user", content)
    }

    /// An assistant turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage::new("assistant", content)
    }
}

/// A tokenizer plus what the bundle says about special tokens and chat formatting.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TextCodec {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path, chat_template: Option<String>, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // Prompts are single sequences: padding configured in the file would feed pad tokens
        // to the model as if they were text.
        tokenizer.with_padding(None);
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        Ok(TextCodec { bos_token: name(bos), eos_token: name(eos), tokenizer, chat_template })
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Token ids for `text`, with the special tokens the tokenizer's post-processor adds
    /// (BOS for Llama tokenizers) when `add_special` is set, as transformers does.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text for `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Whether the bundle carries a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template and a generation prompt.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("this bundle has no chat template; give the prompt raw".into()))?;
        render_chat_template(
            template,
            messages,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }
}

/// Renders a Jinja chat template as transformers does: `messages`, `add_generation_prompt`,
/// `bos_token`, `eos_token` and `raise_exception`, with loop controls (`break`, `continue`).
pub(crate) fn render_chat_template(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| Error::Template(e.to_string()))?;
    let msgs: Vec<_> = messages.iter().map(|m| minijinja::context! { role => m.role, content => m.content }).collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => true,
                bos_token => bos,
                eos_token => eos,
            })
        })
        .map_err(|e| Error::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constructs Hugging Face chat templates use: namespace, loop.first/last, macros,
    /// loop controls, filters (trim, tojson), raise_exception.
    #[test]
    fn templates_with_the_constructs_hugging_face_uses_render() {
        let msgs = [ChatMessage::new("system", " be brief "), ChatMessage::user("hi"), ChatMessage::assistant("yo")];
        let t = "{% macro turn(r, c) %}<|{{ r }}|>{{ c | trim }}{% endmacro %}\
                 {% set ns = namespace(n=0) %}{{ bos_token }}\
                 {% for m in messages %}{% if m.role == 'assistant' %}{% set ns.n = ns.n + 1 %}{% endif %}\
                 {{ turn(m.role, m.content) }}{% if not loop.last %};{% endif %}{% endfor %}\
                 {% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}[{{ m.role | tojson }}]{% endfor %}\
                 {% if add_generation_prompt %}<|assistant|>{{ ns.n }}{% endif %}";
        let out = render_chat_template(t, &msgs, "<s>", "</s>").unwrap();
        assert_eq!(out, "<s><|system|>be brief;<|user|>hi;<|assistant|>yo[\"system\"]<|assistant|>1");
        let e = render_chat_template("{{ raise_exception('roles must alternate') }}", &msgs, "", "").unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }
}
