//! Chat templates render as transformers renders them: each template below, written with the
//! constructs Hugging Face templates use (blocks on lines of their own, which transformers trims;
//! Python string methods as Qwen's templates call them; a reversed scan with a namespace;
//! `strftime_now`; `raise_exception`; `tojson`), is rendered by edgelm and by jinja2 set up as
//! transformers sets it up (tests/python/hf_chat_template.py), and the texts must be equal.

use std::process::Command;

use edgelm_e2e::{python, root, run, scratch};
use edgelm_runtime::tokenizer::{render_chat_template, ChatMessage};

/// Turns on lines of their own: only transformers' `trim_blocks` / `lstrip_blocks` keep the
/// tags' newlines and indentation out of the prompt.
const BLOCKS_ON_LINES: &str = "{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
    {{ '<|system|>\\n' + message['content'] + eos_token }}
{% else %}
{{ '<|assistant|>\\n' + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}";

/// A reversed scan for the last real user turn, thoughts cut out of earlier answers with
/// split / strip, and flags that are not given.
const THINKING: &str = "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and '</think>' in message.content %}
        {%- set answer = message.content.split('</think>')[-1].lstrip('\\n') %}
        {%- set thought = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + answer }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + answer }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if tools %}{{- 'tools!' }}{%- endif %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}";

/// A system message taken off the front, a date from `strftime_now` when it is defined (the
/// year only, so both renderers agree however close to midnight they run), and a filter
/// binding tighter than `+`.
const DATED: &str = "{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now('%Y') %}
    {%- else %}
        {%- set date_string = '01 Jan 2000' %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|header|>system<|/header|>\\n\\nDate: ' + date_string + '\\n\\n' + system_message + '<|eot|>' }}
{%- for message in messages %}
    {{- '<|header|>' + message['role'] + '<|/header|>\\n\\n' + message['content'] | trim + '<|eot|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|header|>assistant<|/header|>\\n\\n' }}{%- endif %}";

/// Roles that must alternate, refused with raise_exception otherwise.
const ALTERNATING: &str = "{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must go user, assistant, user, ...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}";

/// tojson of messages and of a literal (compact and indented), filters, Python methods.
const JSON_AND_FILTERS: &str = "<messages>
  {% for m in messages %}
    {{ m | tojson }}
  {% endfor %}
</messages>
{{ messages | map(attribute='role') | join(',') | upper }}
{{ (messages | length) ~ ' ' ~ messages[-1].content.title() ~ ' ' ~ messages[0].content.replace('.', '!') }}
{{ {'n': messages | length, 'x': 0.25, 'roles': messages | map(attribute='role') | list, 'none': none} | tojson(indent=2) }}
{{ {'z': messages[0], 'a': [1.5e-7, 1e16, true], 1: none} | tojson(ensure_ascii=True, sort_keys=False, separators=(',', ':')) }}
{{ messages[1] | tojson(indent='\t', sort_keys=True) }}
";

/// The assistant's part marked for training (`{% generation %}`), with whitespace control on
/// its tags.
const GENERATION: &str = "{% for message in messages %}
{% if message.role == 'assistant' %}
{{ '<|assistant|>' }}
{%- generation %}
{{ message.content }}
{%- endgeneration +%}

{% else %}
{{ '<|' + message.role + '|>' + message.content }}
{% endif %}
{% endfor %}";

fn conversation(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
    turns.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
}

#[test]
fn templates_render_as_transformers_renders_them() {
    let chat = conversation(&[
        ("system", " Be brief. "),
        ("user", "Wie spät ist es? <b>&</b>"),
        ("assistant", "<think>\nchecking the clock\n</think>\n\nIt is late."),
        ("user", "<tool_response>12:00</tool_response>"),
        ("assistant", "<think>\nnoon\n</think>\n\nNoon."),
        ("user", "Danke\n"),
    ]);
    let alternating = conversation(&[("user", "hi"), ("assistant", "hello"), ("user", "bye")]);
    let mut cases = Vec::new();
    for template in [BLOCKS_ON_LINES, THINKING, DATED, ALTERNATING, JSON_AND_FILTERS, GENERATION] {
        for messages in [&chat, &alternating] {
            cases.push((template, messages.clone()));
        }
    }
    let (bos, eos) = ("<s>", "</s>");
    // Written by hand: serde_json would sort the keys, and a message's keys reach `tojson` in
    // the order the user gave them (role, then content).
    let text = |s: &str| serde_json::to_string(s).unwrap();
    let json: Vec<String> = cases
        .iter()
        .map(|(t, m)| {
            let m: Vec<String> = m
                .iter()
                .map(|m| format!(r#"{{"role": {}, "content": {}}}"#, text(&m.role), text(&m.content)))
                .collect();
            format!(
                r#"{{"template": {}, "messages": [{}], "bos_token": {}, "eos_token": {}}}"#,
                text(t),
                m.join(", "),
                text(bos),
                text(eos)
            )
        })
        .collect();
    let file = scratch().join("chat-template-cases.json");
    std::fs::write(&file, format!("[{}]", json.join(", "))).unwrap();
    let out = run(Command::new(python()).arg(root().join("tests/python/hf_chat_template.py")).arg(&file));
    assert!(out.status.success(), "jinja2: {}", String::from_utf8_lossy(&out.stderr));
    let expected: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut errors = 0;
    for ((template, messages), want) in cases.iter().zip(&expected) {
        let got = render_chat_template(template, messages, bos, eos);
        match (want.as_str(), got) {
            (Some(want), Ok(got)) => assert_eq!(got, want, "template:\n{template}"),
            (None, Err(e)) => {
                let msg = want["error"].as_str().unwrap();
                assert!(e.to_string().contains(msg), "edgelm: {e}; transformers: {msg}");
                errors += 1;
            }
            (want, got) => panic!("transformers {want:?}, edgelm {got:?}\ntemplate:\n{template}"),
        }
    }
    // The alternating template refuses the conversation that opens with a system turn.
    assert_eq!(errors, 1);
}
