//! Chat templates: Hugging Face's Jinja templates rendered with minijinja the way
//! `transformers` renders them (trim_blocks, lstrip_blocks, loop controls,
//! `raise_exception`, a Python-style `tojson`, Python string methods).

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::DataError;
use crate::tokenizer::Message;

const NAME: &str = "chat_template";

/// A compiled chat template and the file it came from.
#[derive(Clone)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The variables a template sees besides `messages` and `add_generation_prompt`
/// (transformers passes the tokenizer's special tokens the same way).
#[derive(Debug, Default, Clone)]
pub(crate) struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pad_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unk_token: Option<&'a str>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names `path` and the template line.
    pub(crate) fn compile(source: &str, path: &Path) -> Result<Self, DataError> {
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
        // extensions=[AssistantTracker, loopcontrols]) with raise_exception, tojson.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| DataError::Template { path: path.to_path_buf(), message: describe(&e) })?;
        Ok(Self { env, path: path.to_path_buf() })
    }

    /// The file this template was read from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renders the conversation.
    pub(crate) fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String, DataError> {
        let ctx = Context {
            messages,
            add_generation_prompt,
            bos_token: special.bos_token.as_deref(),
            eos_token: special.eos_token.as_deref(),
            pad_token: special.pad_token.as_deref(),
            unk_token: special.unk_token.as_deref(),
        };
        let err = |e: Error| DataError::Template { path: self.path.clone(), message: describe(&e) };
        let template = self.env.get_template(NAME).map_err(err)?;
        let mut out = CappedOutput(Vec::new());
        template.render_captured_to(ctx, &mut out).map_err(err)?;
        String::from_utf8(out.0).map_err(|e| DataError::Template { path: self.path.clone(), message: e.to_string() })
    }
}

/// The instructions one rendering may run (minijinja's fuel): a real chat template spends a
/// few thousand on a long conversation; a loop that does not end stops within a second.
const RENDER_FUEL: u64 = 20_000_000;
/// The most one rendering may write: far beyond any conversation's text (one data line is
/// at most 4 MiB), small enough to never exhaust memory.
const MAX_RENDER_BYTES: usize = 32 << 20;

/// The rendering's output, refused past [`MAX_RENDER_BYTES`] while it is written.
struct CappedOutput(Vec<u8>);

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDER_BYTES {
            return Err(std::io::Error::other(format!("renders more than {} MiB", MAX_RENDER_BYTES >> 20)));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for
/// masks; it renders its body unchanged. minijinja has no such tag, so it becomes an
/// `{% if true %}...{% endif %}` with the same whitespace control.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.get(2..).and_then(|t| t.find("%}")).map(|i| i + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = split_control(inner, true);
        let (body, trail) = split_control(body, false);
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits a leading (or trailing) whitespace-control marker `-`/`+` off a tag body.
fn split_control(s: &str, leading: bool) -> (&str, &str) {
    if leading {
        match s.chars().next() {
            Some(c @ ('-' | '+')) => s.split_at(c.len_utf8()),
            _ => ("", s),
        }
    } else {
        match s.chars().last() {
            Some(c @ ('-' | '+')) => {
                let (a, b) = s.split_at(s.len() - c.len_utf8());
                (a, b)
            }
            _ => (s, ""),
        }
    }
}

/// Marks errors raised by the template itself through `raise_exception`.
#[derive(Debug)]
struct Raised;

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

/// One line for a minijinja error: what happened and the template line.
fn describe(err: &Error) -> String {
    let raised = std::error::Error::source(err).is_some_and(|s| s.is::<Raised>());
    let mut msg = match (raised, err.detail()) {
        _ if err.kind() == ErrorKind::OutOfFuel => {
            format!("runs more than {RENDER_FUEL} template instructions (a loop that does not end?)")
        }
        // The only writer is CappedOutput, which fails only past its cap.
        _ if err.kind() == ErrorKind::WriteFailure => format!("renders more than {} MiB", MAX_RENDER_BYTES >> 20),
        (true, Some(detail)) => format!("raise_exception: {detail}"),
        (_, Some(detail)) => format!("{}: {detail}", err.kind()),
        (_, None) => err.kind().to_string(),
    };
    if let Some(line) = err.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, with Python's default separators
/// `", "` and `": "` (minijinja's own filter writes compact, HTML-escaped JSON).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair (item, key)"))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle { indent, sort_keys, item_sep, key_sep };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }
}

fn json_string(s: &str, out: &mut String) -> Result<(), Error> {
    // serde_json escapes exactly what Python's json.dumps(ensure_ascii=False) escapes.
    let quoted =
        serde_json::to_string(s).map_err(|e| Error::new(ErrorKind::InvalidOperation, "tojson").with_source(e))?;
    out.push_str(&quoted);
    Ok(())
}

fn write_json(value: &Value, style: &JsonStyle, depth: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Undefined => {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize an undefined value"))
        }
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else if value.is_integer() {
                    // integers too large for i64: Python prints them exactly.
                    out.push_str(&value.to_string());
                } else {
                    let v = serde_json::Value::from(f);
                    out.push_str(&v.to_string());
                }
            }
        }
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), out)?,
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                style.newline(depth + 1, out);
                match key.as_str() {
                    Some(s) => json_string(s, out)?,
                    None => json_string(&key.to_string(), out)?,
                }
                out.push_str(&style.key_sep);
                write_json(&value.get_item(key)?, style, depth + 1, out)?;
            }
            style.newline(depth, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                style.newline(depth + 1, out);
                write_json(item, style, depth + 1, out)?;
            }
            style.newline(depth, out);
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {}", value.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect()
    }

    fn render(src: &str, messages: &[Message], gen: bool) -> Result<String, DataError> {
        let t = ChatTemplate::compile(src, Path::new("m/chat_template.jinja"))?;
        let special =
            SpecialTokens { bos_token: Some("<s>".into()), eos_token: Some("</s>".into()), ..Default::default() };
        t.render(messages, gen, &special)
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // Block tags swallow their newline and the indentation before them; variables do not.
        let src = "{{ bos_token }}\n  {% for m in messages %}\n    {{ m.role }}: {{ m.content }}\n  {% endfor %}\n    {% if add_generation_prompt %}\nassistant:\n{% endif %}";
        let out = render(src, &msgs(&[("user", "hi")]), true).unwrap();
        assert_eq!(out, "<s>\n    user: hi\nassistant:\n");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}{{ m['content'].strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}{% endfor %}";
        assert_eq!(render(src, &msgs(&[("user", " ab ")]), false).unwrap(), "AB!");
    }

    #[test]
    fn raise_exception_errors_with_its_message_and_line() {
        let src = "x\n{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}";
        let err = render(src, &msgs(&[("user", "hi")]), false).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("m/chat_template.jinja: chat_template: raise_exception: System first!"), "{text}");
        assert!(text.contains("template line 2"), "{text}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err =
            ChatTemplate::compile("ok\n{% if x %}", Path::new("m/tokenizer_config.json")).unwrap_err().to_string();
        assert!(err.starts_with("m/tokenizer_config.json: chat_template: syntax error"), "{err}");
        assert!(err.contains("template line"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ {'b': 1, 'a': [1.5, none, true]} | tojson(sort_keys=true) }}";
        let out = render(src, &msgs(&[("user", "<é\"\n>")]), false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"<é\\\"\\n>\"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \"<é\\\"\\n>\"\n  }\n]|{\"a\": [1.5, null, true], \"b\": 1}"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        assert_eq!(render(src, &msgs(&[("assistant", "yo")]), false).unwrap(), "yo");
        // Malformed tags are left to the parser, which reports them.
        assert_eq!(strip_generation_tags("a {%} b {% x"), "a {%} b {% x");
    }

    #[test]
    fn constructs_of_real_hub_templates_render_like_jinja2() {
        // Qwen/Llama/Mistral-style constructs: whitespace control, missing attributes,
        // `is defined`, namespace(), reversed slices, Python literals and methods.
        let src = r#"{%- set ns = namespace(last_user=-1) %}
{%- for m in messages[::-1] %}
    {%- if ns.last_user == -1 and m.role == "user" %}{%- set ns.last_user = messages|length - 1 - loop.index0 %}{%- endif %}
{%- endfor %}
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nDefault.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" and not message.tool_calls %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
        {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>user\n' + message.content | trim + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt is defined and add_generation_prompt == True and tools is not defined %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
{{- '' if documents is none or documents is not defined else 'docs' }}
{{- ns.last_user }}"#;
        let out = render(
            src,
            &msgs(&[
                ("user", " q "),
                (
                    "assistant",
                    "<think>x</think>
A",
                ),
                ("user", "r"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nDefault.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nr<|im_end|>\n<|im_start|>assistant\n2"
        );
    }

    #[test]
    fn loop_controls_are_enabled() {
        let src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}";
        assert_eq!(render(src, &msgs(&[("user", "a"), ("user", "b")]), false).unwrap(), "a");
    }

    /// Fuzzing: templates assembled from fragments of real chat templates, broken tags and
    /// loops (nested up to 10^15 iterations) compile or fail, and render or fail, never
    /// panicking and within a bounded time. 1,500 cases.
    mod fuzz {
        use std::time::{Duration, Instant};

        use proptest::prelude::*;

        use super::*;

        fn fragment() -> impl Strategy<Value = String> {
            let fixed = [
                "{% for m in messages %}",
                "{% for i in range(100000) %}",
                "{% endfor %}",
                "{% if add_generation_prompt %}",
                "{% if m.role == 'user' %}",
                "{% else %}",
                "{% endif %}",
                "{{ m.content }}",
                "{{ m['role'] | upper }}",
                "{{ messages | tojson }}",
                "{{ messages[0].content * 50 }}",
                "{% set x = messages | length %}",
                "{{ x + 1 }}",
                "{{ loop.index }}",
                "{{ bos_token }}",
                "{{ raise_exception('bad role') }}",
                "{%- generation -%}",
                "{%- endgeneration -%}",
                "{{ m.content.strip().split(' ') }}",
                "{%",
                "}}",
                "{{",
                "\n",
            ];
            prop_oneof![proptest::sample::select(fixed.to_vec()).prop_map(String::from), "[a-z {}%()'|.-]{0,10}"]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]
            #[test]
            fn any_template_renders_or_fails_without_panic_in_bounded_time(
                parts in proptest::collection::vec(fragment(), 0..14),
                contents in proptest::collection::vec(".{0,40}", 1..4),
                generation in any::<bool>(),
            ) {
                let src = parts.concat();
                let roles = ["system", "user", "assistant"];
                let messages: Vec<Message> = contents
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Message { role: roles[i % 3].to_string(), content: c.clone() })
                    .collect();
                let start = Instant::now();
                if let Ok(t) = ChatTemplate::compile(&src, Path::new("fuzz.jinja")) {
                    let _ = t.render(&messages, generation, &SpecialTokens::default());
                }
                prop_assert!(start.elapsed() < Duration::from_secs(5), "{src:?} took {:?}", start.elapsed());
            }
        }
    }
}
