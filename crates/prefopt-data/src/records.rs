//! Reading dataset files into JSON records that remember where they came from.

use std::path::Path;

use serde_json::Value;

use crate::error::{json_kind, DataError, RecordSource};
use crate::parquet_rows::read_parquet_rows;

/// One dataset row as JSON plus where it came from, for error messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The row, always a JSON object.
    pub value: Value,
    /// The file and line (or row) it was read from.
    pub source: RecordSource,
}

/// Reads every record of a dataset file, chosen by extension:
/// `.jsonl` / `.json` (JSON Lines, blank lines skipped; a `.json` file holding one
/// JSON array of objects is read too) or `.parquet` (each row becomes a JSON object).
///
/// A malformed line is an error naming the file, the line and serde's message; an
/// empty file gives `Ok(vec![])` (callers decide whether that is an error).
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jsonl") | Some("json") => read_json_lines(path),
        Some("parquet") => Ok(read_parquet_rows(path)?
            .into_iter()
            .enumerate()
            .map(|(i, row)| Record { value: Value::Object(row), source: RecordSource::row(path, i) })
            .collect()),
        _ => Err(DataError::file(path, "unknown dataset format: expected a .jsonl, .json or .parquet file")),
    }
}

/// The longest JSONL line (one example) read: far beyond any `max_length` budget, and small
/// enough that tokenizing it stays fast.
pub const MAX_LINE_BYTES: usize = 4 << 20;

fn read_json_lines(path: &Path) -> Result<Vec<Record>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..valid].iter().filter(|&&b| b == b'\n').count();
            return Err(DataError::record(&RecordSource::line(path, line), "not valid UTF-8"));
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);

    // A `.json` file may also be one JSON array of records (as `datasets` reads it).
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> =
            serde_json::from_str(text).map_err(|e| DataError::file(path, format!("not valid JSON: {e}")))?;
        return items
            .into_iter()
            .enumerate()
            .map(|(i, value)| object_record(value, RecordSource::index(path, i)))
            .collect();
    }

    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let source = RecordSource::line(path, i + 1);
        if line.len() > MAX_LINE_BYTES {
            return Err(DataError::record(
                &source,
                format!(
                    "the line is {:.1} MiB; one example may be at most {} MiB (it is cut to max_length tokens \
                     anyway, and tokenizing megabytes of text takes minutes)",
                    line.len() as f64 / (1 << 20) as f64,
                    MAX_LINE_BYTES >> 20
                ),
            ));
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| DataError::record(&source, format!("not valid JSON: {e}")))?;
        records.push(object_record(value, source)?);
    }
    Ok(records)
}

fn object_record(value: Value, source: RecordSource) -> Result<Record, DataError> {
    if value.is_object() {
        Ok(Record { value, source })
    } else {
        Err(DataError::record(&source, format!("expected a JSON object, found {}", json_kind(&value))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Fields};
    use parquet::arrow::ArrowWriter;
    use serde_json::json;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.jsonl");
        let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(MAX_LINE_BYTES));
        std::fs::write(&path, format!("{{\"prompt\": \"a\"}}\n{big}\n")).unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("huge.jsonl:2") && err.contains("at most 4 MiB"), "{err}");
    }

    #[test]
    fn jsonl_records_carry_their_line_numbers_and_skip_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.jsonl", "{\"a\": 1}\n\n  \n{\"a\": 2}\r\n");
        let recs = read_records(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].source, RecordSource::line(&p, 1));
        assert_eq!(recs[1].source, RecordSource::line(&p, 4));
        assert_eq!(recs[1].value, json!({"a": 2}));
    }

    #[test]
    fn malformed_jsonl_line_is_an_error_with_its_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.jsonl", "{\"a\": 1}\n\n{\"a\": 1 \"b\": 2}\n");
        let err = read_records(&p).unwrap_err().to_string();
        assert_eq!(err, format!("{}:3: not valid JSON: expected `,` or `}}` at line 1 column 9", p.display()));
    }

    #[test]
    fn a_line_that_is_not_an_object_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.json", "{\"a\": 1}\n[1, 2]\n");
        let err = read_records(&p).unwrap_err().to_string();
        assert!(err.ends_with(":2: expected a JSON object, found a list"), "{err}");
    }

    #[test]
    fn json_array_files_are_read_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.json", "[\n {\"a\": 1},\n {\"a\": 2}\n]\n");
        let recs = read_records(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].source, RecordSource::index(&p, 1));
    }

    #[test]
    fn empty_file_gives_no_records_and_unknown_extension_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.jsonl", "");
        assert!(read_records(&p).unwrap().is_empty());
        let p = write(dir.path(), "d.csv", "a,b\n");
        let err = read_records(&p).unwrap_err().to_string();
        assert!(err.contains("unknown dataset format"), "{err}");
        let missing = dir.path().join("nope.jsonl");
        let err = read_records(&missing).unwrap_err().to_string();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn parquet_rows_become_json_objects_with_row_indices() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.parquet");

        // prompt: string, n: int64, chosen: list<struct<role, content>> (TRL conversational).
        let msg_fields =
            Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)]);
        let mut chosen = ListBuilder::new(StructBuilder::from_fields(msg_fields, 0));
        for (role, content) in [("user", "hi"), ("assistant", "yo")] {
            let s = chosen.values();
            s.field_builder::<StringBuilder>(0).unwrap().append_value(role);
            s.field_builder::<StringBuilder>(1).unwrap().append_value(content);
            s.append(true);
        }
        chosen.append(true);
        chosen.append(false); // a null list
        let prompt: ArrayRef = Arc::new(StringArray::from(vec![Some("p0"), None]));
        let n: ArrayRef = Arc::new(Int64Array::from(vec![7, -1]));
        let chosen: ArrayRef = Arc::new(chosen.finish());
        let batch = RecordBatch::try_from_iter(vec![("prompt", prompt), ("n", n), ("chosen", chosen)]).unwrap();
        let file = std::fs::File::create(&p).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();

        let recs = read_records(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0].value,
            json!({"prompt": "p0", "n": 7, "chosen": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]})
        );
        assert_eq!(recs[1].value, json!({"prompt": null, "n": -1, "chosen": null}));
        assert_eq!(recs[1].source, RecordSource::row(&p, 1));
        assert_eq!(recs[1].source.to_string(), format!("{}: row 1", p.display()));
    }

    #[test]
    fn unreadable_parquet_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "d.parquet", "not parquet");
        let err = read_records(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: cannot read Parquet", p.display())), "{err}");
    }

    /// Fuzzing the row reader and the row parsers: arbitrary bytes as a JSONL file, and
    /// arbitrary JSON rows as preference and SFT examples, give records or errors, never a
    /// panic. 2,000 + 3,000 cases.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::{parse_preference, parse_sft};

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                proptest::sample::select(vec![
                    "prompt",
                    "chosen",
                    "rejected",
                    "role",
                    "user",
                    "assistant",
                    "content",
                    ""
                ])
                .prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                let key = proptest::sample::select(vec![
                    "prompt",
                    "chosen",
                    "rejected",
                    "completion",
                    "messages",
                    "role",
                    "content",
                    "label",
                    "x",
                ]);
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::btree_map(key.prop_map(String::from), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
            #[test]
            fn any_bytes_read_as_records_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let dir = tempfile::tempdir().unwrap();
                for name in ["d.jsonl", "d.json", "d.parquet"] {
                    let p = dir.path().join(name);
                    std::fs::write(&p, &bytes).unwrap();
                    let _ = read_records(&p);
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
            #[test]
            fn any_json_row_parses_or_fails_naming_the_row(value in json()) {
                let record = Record { value, source: RecordSource::line(Path::new("f.jsonl"), 3) };
                for e in [parse_preference(&record).err(), parse_sft(&record).err()].into_iter().flatten() {
                    prop_assert!(e.to_string().contains("f.jsonl:3"), "{e}");
                }
            }
        }
    }
}
