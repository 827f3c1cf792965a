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
        // Rewritten once here rather than on every request.
        let chat_template = chat_template.map(|t| generation_blocks_as_plain(&t).into_owned());
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
        render_plain_template(
            template,
            messages,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }
}

/// The chat template a `tokenizer_config.json` holds: its `chat_template` string, or from a
/// list of named templates (`[{name, template}]`) the one named `default`, as transformers
/// picks when no other is asked for (the last of that name). A list without one has no
/// template edgelm can choose: warned about, and prompts go to the model as they are.
pub fn chat_template_in(tokenizer_config: &serde_json::Value) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Array(named) => {
            let default = named
                .iter()
                .rev()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|e| e.get("template")?.as_str().map(str::to_owned));
            if default.is_none() {
                let names: Vec<&str> = named.iter().filter_map(|e| e.get("name")?.as_str()).collect();
                tracing::warn!(
                    "tokenizer_config.json has chat templates named {names:?} but none named `default`; prompts are used without a template"
                );
            }
            default
        }
        _ => None,
    }
}

/// Renders a Jinja chat template as transformers' `apply_chat_template` does: blocks trimmed
/// (`trim_blocks`, `lstrip_blocks`: the newline after a tag and the indentation before one are
/// not output), loop controls, `{% generation %}` blocks (output as they are), Python's string
/// methods (`startswith`, `split`, `strip`, ..., which Qwen's templates call), transformers'
/// `tojson` (Python's `json.dumps`), the functions `raise_exception` and `strftime_now` (in UTC:
/// transformers uses the host's local time), and the variables `messages`,
/// `add_generation_prompt` (true), `tools` and `documents` (none), `bos_token` and `eos_token`.
pub fn render_chat_template(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String> {
    render_plain_template(&generation_blocks_as_plain(template), messages, bos, eos)
}

/// [`render_chat_template`] of a template whose `{% generation %}` blocks are rewritten already.
fn render_plain_template(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_filter("tojson", |value: minijinja::Value, kwargs: minijinja::value::Kwargs| {
        let style = JsonStyle::from_kwargs(&kwargs)?;
        kwargs.assert_all_used()?;
        let mut out = String::new();
        python_json(&value, &style, 0, &mut out)?;
        Ok(minijinja::Value::from_safe_string(out))
    });
    env.add_function("strftime_now", |format: String| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        strftime(&format, now)
    });
    env.add_template("chat", template).map_err(|e| Error::Template(e.to_string()))?;
    let msgs: Vec<_> = messages.iter().map(|m| minijinja::context! { role => m.role, content => m.content }).collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => true,
                tools => (),
                documents => (),
                bos_token => bos,
                eos_token => eos,
            })
        })
        .map_err(|e| Error::Template(e.to_string()))
}

/// transformers marks the assistant's part of a template with `{% generation %}` ...
/// `{% endgeneration %}` (to find the answer's tokens when training) and outputs the inside
/// unchanged. minijinja has no such tag: each becomes an `if true` / `endif` with the same
/// whitespace control, which outputs the same text. The template is read tag by tag, so text
/// in strings, comments and raw blocks is left as it is.
fn generation_blocks_as_plain(template: &str) -> std::borrow::Cow<'_, str> {
    // Every block has an end tag; most templates mention `add_generation_prompt` and nothing more.
    if !template.contains("endgeneration") {
        return template.into();
    }
    let mut out = String::with_capacity(template.len());
    let mut i = 0;
    while i < template.len() {
        let rest = &template[i..];
        let Some(open) = rest.find('{') else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let end = if tag.starts_with("{#") {
            tag.find("#}").map(|e| e + 2)
        } else if tag.starts_with("{{") {
            tag_end(tag, "}}")
        } else if tag.starts_with("{%") {
            tag_end(tag, "%}")
        } else {
            Some(1)
        };
        let Some(end) = end else {
            out.push_str(tag);
            break;
        };
        let mut len = end;
        if tag.starts_with("{%") {
            let inner = &tag[2..end - 2];
            let open_ws = if inner.starts_with(['-', '+']) { &inner[..1] } else { "" };
            let close_ws = if inner[open_ws.len()..].ends_with(['-', '+']) { &inner[inner.len() - 1..] } else { "" };
            match inner[open_ws.len()..inner.len() - close_ws.len()].trim() {
                "generation" => out.push_str(&format!("{{%{open_ws} if true {close_ws}%}}")),
                "endgeneration" => out.push_str(&format!("{{%{open_ws} endif {close_ws}%}}")),
                "raw" => {
                    // Up to and with the `endraw` tag, untouched.
                    len = tag.find("endraw").and_then(|r| tag[r..].find("%}").map(|e| r + e + 2)).unwrap_or(tag.len());
                    out.push_str(&tag[..len]);
                }
                _ => out.push_str(&tag[..end]),
            }
        } else {
            out.push_str(&tag[..end]);
        }
        i += open + len;
    }
    out.into()
}

/// Where the `{{` or `{%` tag at the start of `tag` ends (after `close`), skipping strings.
fn tag_end(tag: &str, close: &str) -> Option<usize> {
    let bytes = tag.as_bytes();
    let (mut k, mut quote) = (2, None::<u8>);
    while k < bytes.len() {
        match (quote, bytes[k]) {
            (Some(_), b'\\') => k += 1,
            (Some(q), c) if c == q => quote = None,
            (None, c @ (b'\'' | b'"')) => quote = Some(c),
            (None, _) if bytes[k..].starts_with(close.as_bytes()) => return Some(k + 2),
            _ => {}
        }
        k += 1;
    }
    None
}

/// How transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` writes JSON: Python's `json.dumps` with those arguments.
struct JsonStyle {
    /// Text per level of indentation; `None` writes everything on one line.
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn from_kwargs(kwargs: &minijinja::value::Kwargs) -> std::result::Result<Self, minijinja::Error> {
        let bad = |what: &str| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {what}"));
        let indent = match kwargs.get::<Option<minijinja::Value>>("indent")? {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => match (v.as_str(), i64::try_from(v.clone())) {
                (Some(text), _) => Some(text.to_owned()),
                (None, Ok(n)) => Some(" ".repeat(n.max(0) as usize)),
                _ => return Err(bad("indent is a number or a string")),
            },
        };
        let (item_separator, key_separator) = match kwargs.get::<Option<Vec<String>>>("separators")? {
            Some(pair) => match <[String; 2]>::try_from(pair) {
                Ok([item, key]) => (item, key),
                Err(_) => return Err(bad("separators is a pair (item separator, key separator)")),
            },
            None => ((if indent.is_some() { "," } else { ", " }).to_owned(), ": ".to_owned()),
        };
        Ok(JsonStyle {
            indent,
            item_separator,
            key_separator,
            sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
            ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        })
    }

    fn string(&self, s: &str) -> String {
        let quoted = serde_json::to_string(s).expect("a string serializes");
        if !self.ensure_ascii || s.is_ascii() {
            return quoted;
        }
        let mut out = String::with_capacity(quoted.len() + 8);
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0u16; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out
    }
}

/// `value` as Python's `json.dumps` writes it in `style` (transformers' `tojson`): keys in
/// their order unless sorted, keys that are numbers, booleans or none written as Python writes
/// them, undefined values refused as Python refuses them.
fn python_json(
    value: &minijinja::Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(unit) = &style.indent {
            out.push('\n');
            out.push_str(&unit.repeat(depth));
        }
    };
    match value.kind() {
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::UndefinedError,
                "tojson: an undefined value is not JSON serializable",
            ))
        }
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
            let is_map = value.kind() == ValueKind::Map;
            let mut items: Vec<minijinja::Value> = value.try_iter().map(|it| it.collect()).unwrap_or_default();
            if is_map && style.sort_keys {
                items.sort();
            }
            let (open, close) = if is_map { ('{', '}') } else { ('[', ']') };
            out.push(open);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_separator);
                }
                newline(out, depth + 1);
                if is_map {
                    out.push_str(&json_key(item, style)?);
                    out.push_str(&style.key_separator);
                    python_json(&value.get_item(item)?, style, depth + 1, out)?;
                } else {
                    python_json(item, style, depth + 1, out)?;
                }
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(close);
        }
        _ => out.push_str(&json_scalar(value, style)),
    }
    Ok(())
}

/// A scalar as JSON: none, booleans, numbers (floats as Python's `repr`), strings; anything
/// else as its string form.
fn json_scalar(value: &minijinja::Value, style: &JsonStyle) -> String {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if value.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number => match (value.is_integer(), f64::try_from(value.clone())) {
            (false, Ok(f)) => python_float(f),
            _ => value.to_string(),
        },
        _ => style.string(&value.as_str().map_or_else(|| value.to_string(), str::to_owned)),
    }
}

/// A map key as `json.dumps` writes it: strings as they are, numbers, booleans and none as
/// their JSON text in quotes; other keys are refused.
fn json_key(key: &minijinja::Value, style: &JsonStyle) -> std::result::Result<String, minijinja::Error> {
    use minijinja::value::ValueKind;
    match key.kind() {
        ValueKind::String => Ok(style.string(key.as_str().unwrap_or_default())),
        ValueKind::None | ValueKind::Bool | ValueKind::Number => Ok(style.string(&json_scalar(key, style))),
        _ => Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("tojson: keys must be strings, numbers, booleans or none, not {}", key.kind()),
        )),
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back the same, in
/// positional notation when the decimal exponent is from -4 to 15 (`1.0`, `0.0001`,
/// `9999999999999998.0`), in scientific notation otherwise (`1e-05`, `1e+16`).
fn python_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{f:e}"); // shortest round-trip digits: "-1.5e16", "1e-5", "0e0"
    let (mantissa, exp) = sci.split_once('e').expect("`e` format has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    if !(-4..16).contains(&exp) {
        return format!("{sign}{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let body = if exp < 0 {
        format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
    } else {
        let whole = exp as usize + 1;
        if digits.len() <= whole {
            format!("{digits}{}.0", "0".repeat(whole - digits.len()))
        } else {
            format!("{}.{}", &digits[..whole], &digits[whole..])
        }
    };
    format!("{sign}{body}")
}

/// `secs` after the Unix epoch (UTC) in a C `strftime` format; the conversions templates use
/// for dates (`%d %b %Y`, `%B`, `%m`, `%y`, `%H:%M:%S`, `%A`, `%a`, `%j`, `%%`). Others are an
/// error naming them.
fn strftime(format: &str, secs: u64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = (secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().unwrap_or('%');
        let part = match spec {
            'd' => format!("{day:02}"),
            'e' => format!("{day:2}"),
            'm' => format!("{month:02}"),
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'B' => MONTHS[month as usize - 1].to_owned(),
            'b' | 'h' => MONTHS[month as usize - 1][..3].to_owned(),
            'A' => DAYS[weekday].to_owned(),
            'a' => DAYS[weekday][..3].to_owned(),
            'j' => format!("{day_of_year:03}"),
            'H' => format!("{h:02}"),
            'M' => format!("{m:02}"),
            'S' => format!("{s:02}"),
            '%' => "%".to_owned(),
            other => {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("strftime_now: the conversion %{other} is not supported"),
                ))
            }
        };
        out.push_str(&part);
    }
    Ok(out)
}

/// (year, month 1-12, day 1-31) of `days` since 1970-01-01 in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Counted from 0000-03-01 in 400-year eras, so the leap day ends each year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of `civil_from_days`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let m = i64::from(month);
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let render = |t: &str| render_chat_template(t, &[], "", "");
        let dict = "{'b': [1, 2.5, '<é>', true], 'a': {}, 'c': none, 'd': []}";
        assert_eq!(
            render(&format!("{{{{ {dict} | tojson }}}}")).unwrap(),
            r#"{"b": [1, 2.5, "<é>", true], "a": {}, "c": null, "d": []}"#
        );
        assert_eq!(
            render(&format!("{{{{ {dict} | tojson(indent=2) }}}}")).unwrap(),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"<é>\",\n    true\n  ],\n  \"a\": {},\n  \"c\": null,\n  \"d\": []\n}"
        );
        let args = "tojson(ensure_ascii=True, sort_keys=True, separators=(',', ':'))";
        assert_eq!(
            render(&format!("{{{{ {dict} | {args} }}}}")).unwrap(),
            r#"{"a":{},"b":[1,2.5,"<\u00e9>",true],"c":null,"d":[]}"#
        );
        // Keys that are not strings are written the way json.dumps writes them. They sit in
        // two dicts because Python treats `1` and `True` as one key while minijinja's map
        // hashes them apart and only sometimes merges them: a template holding both gets
        // engine-defined output, so no test can pin it.
        assert_eq!(
            render("{{ {1: 'x', none: 'z', 0.5: 'w'} | tojson }}").unwrap(),
            r#"{"1": "x", "null": "z", "0.5": "w"}"#
        );
        assert_eq!(
            render("{{ {true: 'y', false: 'n'} | tojson(sort_keys=True) }}").unwrap(),
            r#"{"false": "n", "true": "y"}"#
        );
        assert!(render("{{ [nothing] | tojson }}").unwrap_err().to_string().contains("undefined"));
        let floats: Vec<String> =
            [1.0, 0.1, 1e-5, 1e16, 1.5e16, 0.0001, 123456789.0, -2e-7, 9999999999999998.0, 0.0, -0.0, 0.00012345]
                .map(python_float)
                .into();
        assert_eq!(
            floats,
            [
                "1.0",
                "0.1",
                "1e-05",
                "1e+16",
                "1.5e+16",
                "0.0001",
                "123456789.0",
                "-2e-07",
                "9999999999999998.0",
                "0.0",
                "-0.0",
                "0.00012345"
            ]
        );
    }

    #[test]
    fn generation_blocks_output_what_they_hold() {
        let t = "{%- for m in messages %}{% generation -%}\n[{{ m.content }}]{%- endgeneration +%}\n{% endfor %}";
        let plain = generation_blocks_as_plain(t);
        assert_eq!(plain, "{%- for m in messages %}{% if true -%}\n[{{ m.content }}]{%- endif +%}\n{% endfor %}");
        let msgs = [ChatMessage::user("a"), ChatMessage::assistant("b")];
        assert_eq!(render_chat_template(t, &msgs, "", "").unwrap(), "[a]\n[b]\n");
        assert!(matches!(generation_blocks_as_plain("{{ x }}"), std::borrow::Cow::Borrowed(_)));
        // Text that only looks like tags is kept as it is, whole: in strings, comments, raw
        // blocks, and an unclosed tag at the end.
        let odd = "{{ '{%}' ~ \"%}{% generation %}\" }}{% generation %}a{% endgeneration %}{# {% generation %} #}\
                   {% raw %}{% generation %}{% endraw %}{%- if true -%}x{% endif %}";
        let plain = generation_blocks_as_plain(odd);
        assert_eq!(
            plain,
            "{{ '{%}' ~ \"%}{% generation %}\" }}{% if true %}a{% endif %}{# {% generation %} #}\
             {% raw %}{% generation %}{% endraw %}{%- if true -%}x{% endif %}"
        );
        assert_eq!(render_chat_template(odd, &msgs, "", "").unwrap(), "{%}%}{% generation %}a{% generation %}x");
        assert_eq!(generation_blocks_as_plain("{% endgeneration %}{{ 'open"), "{% endif %}{{ 'open");
        // Characters of more than one byte inside a tag, closed or not.
        assert_eq!(generation_blocks_as_plain("{% endgeneration %}{{ naïve }}é"), "{% endif %}{{ naïve }}é");
        assert_eq!(generation_blocks_as_plain("{% endgeneration %}{{ naïve"), "{% endif %}{{ naïve");
    }

    #[test]
    fn dates_format_as_strftime_does() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%d %b %Y|%B %e|%m/%y|%H:%M:%S|%A %a|%j|%%", t).unwrap(),
            "29 Feb 2024|February 29|02/24|13:05:09|Thursday Thu|060|%"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert_eq!(strftime("%Y-%m-%d %j", 4_102_358_400).unwrap(), "2099-12-31 365");
        for days in [-1000, 0, 59, 60, 11_016, 47_482, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert!(strftime("%Q", 0).unwrap_err().to_string().contains("%Q"));
    }
}
