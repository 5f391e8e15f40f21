//! A preference file, tokenized once: the kept pairs, where each came from, how many were
//! dropped by the length budget, and two optional per-pair column pairs:
//!
//! - `ref_chosen_logps` / `ref_rejected_logps`: precomputed reference log-probs (TRL's column
//!   names). When a file has them, they are the reference and no reference model runs; the
//!   online loop writes them for APO's exact extrapolated reference (methods.md section 3).
//! - `win_prob_chosen` / `win_prob_rejected`: estimated win probabilities in [0, 1] for the
//!   soft `sppo` loss; the online loop writes them from its judge's scores.
//!
//! A column pair is present when any kept row has either column; then every kept row must
//! have both, as finite numbers (win probabilities in [0, 1]). Rows dropped by truncation
//! are not read further.

use std::path::{Path, PathBuf};

use prefopt_data::{
    parse_preference, read_records, tokenize_pair, tokenize_records, HfTokenizer, PairOutcome, Record, TokenizeOptions,
    TokenizedPair,
};

use crate::TrainError;

/// Tokenized preference pairs of one file.
pub struct PairDataset {
    pub path: PathBuf,
    pub pairs: Vec<TokenizedPair>,
    /// Where pair i came from (e.g. `train.jsonl:7`), for error messages.
    pub sources: Vec<String>,
    /// Examples dropped because their prompt alone filled `max_length`.
    pub dropped: usize,
    /// Where pair i is among the file's records (0-based), so callers can line results up
    /// with the file's rows.
    pub rows: Vec<usize>,
    /// Per kept pair, (ref_chosen_logps, ref_rejected_logps) when the file has the columns.
    pub ref_logps: Option<Vec<(f32, f32)>>,
    /// Per kept pair, (win_prob_chosen, win_prob_rejected) when the file has the columns.
    pub win_probs: Option<Vec<(f32, f32)>>,
    /// Kept pairs whose chosen or rejected completion starts at the shared token prefix
    /// (`prompt_boundary = "common_prefix"`).
    pub boundary_moved: usize,
}

/// The optional reference log-prob columns (TRL's names).
pub const REF_COLUMNS: [&str; 2] = ["ref_chosen_logps", "ref_rejected_logps"];
/// The optional win-probability columns.
pub const WIN_PROB_COLUMNS: [&str; 2] = ["win_prob_chosen", "win_prob_rejected"];

impl PairDataset {
    /// Reads and tokenizes `path`. An empty file, or one whose every example is dropped by
    /// truncation, is an error: training on nothing is never what the user meant.
    pub fn load(path: &Path, tok: &HfTokenizer, opts: &TokenizeOptions) -> Result<Self, TrainError> {
        let records = read_nonempty(path)?;
        let outcomes = tokenize_records(path, &records, |r| tokenize_pair(tok, &parse_preference(r)?, opts))?;
        let outcomes = outcomes.into_iter().map(|o| match o {
            PairOutcome::Kept(pair) => Ok(pair),
            PairOutcome::Dropped(reason) => Err(reason),
        });
        let (kept_rows, dropped) = keep(path, &records, outcomes)?;
        let rows: Vec<usize> = kept_rows.iter().map(|k| k.row).collect();
        let kept: Vec<&Record> = kept_rows.iter().map(|k| k.record).collect();
        let pairs: Vec<TokenizedPair> = kept_rows.into_iter().map(|k| k.example).collect();
        let pairs_of = |c: Option<Vec<[f32; 2]>>| c.map(|v| v.into_iter().map(|[a, b]| (a, b)).collect());
        let ref_logps = pairs_of(read_columns(&kept, REF_COLUMNS, None)?);
        let win_probs = pairs_of(read_columns(&kept, WIN_PROB_COLUMNS, Some((0.0, 1.0)))?);
        let sources = kept.iter().map(|r| r.source.to_string()).collect();
        let boundary_moved = pairs.iter().filter(|p| p.chosen.boundary_moved || p.rejected.boundary_moved).count();
        Ok(Self { path: path.to_path_buf(), pairs, sources, dropped, rows, ref_logps, win_probs, boundary_moved })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A data file's records; an error when it holds none (training on nothing is never what
/// the user meant).
pub(crate) fn read_nonempty(path: &Path) -> Result<Vec<Record>, TrainError> {
    let records = read_records(path)?;
    if records.is_empty() {
        return Err(TrainError::EmptyData { path: path.to_path_buf() });
    }
    Ok(records)
}

/// An example kept by the length budget, and where it came from.
pub(crate) struct Kept<'r, T> {
    /// Its position among the file's records (0-based).
    pub row: usize,
    pub record: &'r Record,
    pub example: T,
}

/// The examples of `records` that each outcome keeps (`Ok`) and how many were dropped
/// (`Err(reason)`); when none is kept, an error with the count and the first reason.
pub(crate) fn keep<'r, T>(
    path: &Path,
    records: &'r [Record],
    outcomes: impl IntoIterator<Item = Result<T, String>>,
) -> Result<(Vec<Kept<'r, T>>, usize), TrainError> {
    let (mut kept, mut dropped, mut first_reason) = (Vec::new(), 0, None);
    for (row, (record, outcome)) in records.iter().zip(outcomes).enumerate() {
        match outcome {
            Ok(example) => kept.push(Kept { row, record, example }),
            Err(reason) => {
                dropped += 1;
                first_reason.get_or_insert(format!("{}: {reason}", record.source));
            }
        }
    }
    if kept.is_empty() {
        return Err(TrainError::AllDropped {
            path: path.to_path_buf(),
            dropped,
            example: first_reason.unwrap_or_default(),
        });
    }
    Ok((kept, dropped))
}

/// The columns `names` from every row, or `None` when no row has any of them; values must be
/// finite and, with `range`, inside it.
pub(crate) fn read_columns<const N: usize>(
    rows: &[&Record],
    names: [&'static str; N],
    range: Option<(f64, f64)>,
) -> Result<Option<Vec<[f32; N]>>, TrainError> {
    let has = |r: &Record, name: &str| r.value.get(name).is_some_and(|v| !v.is_null());
    let Some(first) = rows.iter().find(|r| names.iter().any(|n| has(r, n))) else {
        return Ok(None);
    };
    let first_name = names.iter().find(|n| has(first, n)).copied().unwrap_or(names[0]);
    let value = |r: &Record, name: &'static str| -> Result<f32, TrainError> {
        let bad = |message: String| TrainError::Column { at: r.source.clone(), field: name, message };
        let v = r.value.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
            let all: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            bad(format!(
                "missing, but {} has `{first_name}`; give {} on every row or on none",
                first.source,
                all.join(" and ")
            ))
        })?;
        let x = v.as_f64().ok_or_else(|| bad(format!("expected a number, got {v}")))?;
        if !x.is_finite() {
            return Err(bad(format!("{x} is not finite")));
        }
        if let Some((lo, hi)) = range {
            if !(lo..=hi).contains(&x) {
                return Err(bad(format!("{x} is outside [{lo}, {hi}]")));
            }
        }
        Ok(x as f32)
    };
    let row = |r: &Record| -> Result<[f32; N], TrainError> {
        let mut out = [0f32; N];
        for (slot, name) in out.iter_mut().zip(names) {
            *slot = value(r, name)?;
        }
        Ok(out)
    };
    rows.iter().map(|r| row(r)).collect::<Result<Vec<_>, _>>().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(rows: &str) -> Result<PairDataset, TrainError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.jsonl");
        std::fs::write(&path, rows).unwrap();
        let tok =
            HfTokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/qwen2-tied"))
                .unwrap();
        PairDataset::load(&path, &tok, &TokenizeOptions { max_length: Some(64), ..TokenizeOptions::default() })
    }

    const PAIR: &str = r#""prompt": "Q?", "chosen": "1", "rejected": "2""#;

    #[test]
    fn optional_columns_are_read_per_pair_in_order() {
        let data = load(&format!(
            "{{{PAIR}, \"ref_chosen_logps\": -1.5, \"ref_rejected_logps\": -2.0, \"win_prob_chosen\": 1.0, \"win_prob_rejected\": 0.25}}\n\
             {{{PAIR}, \"ref_chosen_logps\": -3, \"ref_rejected_logps\": 0.5, \"win_prob_chosen\": 0.5, \"win_prob_rejected\": 0}}\n"
        ))
        .unwrap();
        assert_eq!(data.ref_logps, Some(vec![(-1.5, -2.0), (-3.0, 0.5)]));
        assert_eq!(data.win_probs, Some(vec![(1.0, 0.25), (0.5, 0.0)]));
        let plain = load(&format!("{{{PAIR}}}\n")).unwrap();
        assert!(plain.ref_logps.is_none() && plain.win_probs.is_none());
    }

    #[test]
    fn sppo_without_win_prob_columns_is_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pairs.jsonl");
        std::fs::write(&data, format!("{{{PAIR}}}\n")).unwrap();
        let cfg = crate::TrainConfig {
            model: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/qwen2-tied"),
            train_data: data,
            output_dir: dir.path().join("out"),
            loss_type: crate::config::LossTypes::One(crate::losses::LossType::Sppo),
            ..crate::TrainConfig::default()
        };
        let err = crate::train(&cfg, &mut crate::Quiet).err().expect("must fail").to_string();
        assert!(err.contains("`win_prob_chosen` and `win_prob_rejected` in") && err.contains("pairs.jsonl"), "{err}");
    }

    #[test]
    fn partial_or_bad_columns_name_the_line_and_field() {
        let msg = |rows: String| load(&rows).err().expect("must fail").to_string();
        let missing = msg(format!("{{{PAIR}, \"win_prob_chosen\": 0.5, \"win_prob_rejected\": 0.1}}\n{{{PAIR}}}\n"));
        assert!(missing.contains("pairs.jsonl:2: field `win_prob_chosen`: missing"), "{missing}");
        let half = msg(format!("{{{PAIR}, \"ref_chosen_logps\": -1.0}}\n"));
        assert!(half.contains("pairs.jsonl:1: field `ref_rejected_logps`: missing"), "{half}");
        let range = msg(format!("{{{PAIR}, \"win_prob_chosen\": 1.5, \"win_prob_rejected\": 0.1}}\n"));
        assert!(range.contains("field `win_prob_chosen`: 1.5 is outside [0, 1]"), "{range}");
        let text = msg(format!("{{{PAIR}, \"ref_chosen_logps\": \"x\", \"ref_rejected_logps\": 0}}\n"));
        assert!(text.contains("field `ref_chosen_logps`: expected a number"), "{text}");
    }
}
