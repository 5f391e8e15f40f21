//! Models by Hugging Face name: `org/name` (optionally `@revision`) wherever a model folder
//! is accepted resolves to a snapshot in the local Hugging Face cache, offline.
//!
//! The cache layout is huggingface_hub's: `<cache>/models--<org>--<name>/refs/<revision>`
//! holds a commit hash, and `snapshots/<hash>/` the files. The cache is `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded: a name that is not
//! in the cache is an error that lists the paths tried and says how to fetch it.

use std::path::{Path, PathBuf};

use crate::{ModelError, Result};

/// A model folder given on the command line or in a config: an existing path is used as it
/// is; otherwise `org/name[@revision]` is looked up in the local Hugging Face cache.
pub fn resolve_model(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    let Some((repo, revision)) = parse_name(&text) else {
        return Err(ModelError::Io { path: spec.into(), message: "no such model folder".into() });
    };
    let caches = cache_dirs();
    let mut tried = Vec::new();
    for cache in &caches {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let commit = if is_commit(revision) {
            revision.to_string()
        } else {
            let refs = repo_dir.join("refs").join(revision);
            match std::fs::read_to_string(&refs) {
                Ok(c) => c.trim().to_string(),
                Err(_) => {
                    tried.push(refs);
                    continue;
                }
            }
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if snapshot.is_dir() {
            return Ok(snapshot);
        }
        tried.push(snapshot);
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(ModelError::Io {
        path: spec.into(),
        message: format!(
            "neither a folder nor a model in the local Hugging Face cache (looked for {}); prefopt does not \
             download: fetch it with `hf download {repo}{}` (or `huggingface-cli download`), or give the \
             folder's path",
            tried.join(", "),
            if revision == "main" { String::new() } else { format!(" --revision {revision}") },
        ),
    })
}

/// `org/name` or `org/name@revision` (revision `main` when absent); `None` for anything that
/// does not look like a hub name (absolute or `./` paths, more than one `/`, odd characters).
fn parse_name(text: &str) -> Option<(&str, &str)> {
    let (repo, revision) = match text.split_once('@') {
        Some((repo, rev)) if !rev.is_empty() => (repo, rev),
        Some(_) => return None,
        None => (text, "main"),
    };
    let (org, name) = repo.split_once('/')?;
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let revision_ok =
        !revision.contains("..") && revision.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    (part_ok(org) && part_ok(name) && revision_ok).then_some((repo, revision))
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The Hugging Face cache folders, in huggingface_hub's order of precedence.
fn cache_dirs() -> Vec<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(cache) = var("HF_HUB_CACHE") {
        return vec![cache];
    }
    if let Some(home) = var("HF_HOME") {
        return vec![home.join("hub")];
    }
    var("HOME").map(|h| vec![h.join(".cache/huggingface/hub")]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_from_paths() {
        assert_eq!(parse_name("Qwen/Qwen2.5-0.5B-Instruct"), Some(("Qwen/Qwen2.5-0.5B-Instruct", "main")));
        assert_eq!(parse_name("org/name@v1.0"), Some(("org/name", "v1.0")));
        for path in ["/abs/path", "./rel/path", "a/b/c", "name", "../x", "org/name@", "org/.hidden", "org/na me"] {
            assert_eq!(parse_name(path), None, "{path}");
        }
    }
}
