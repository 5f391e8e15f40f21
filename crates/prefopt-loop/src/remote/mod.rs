//! OpenAI-compatible inference servers (vLLM, SGLang, `transformers serve`) in the loop: the
//! HTTP client and its retry rules ([`client`]), answers kept on disk as they arrive so an
//! interrupted stage resumes ([`journal`]), and the completion sampler ([`sampler`]). The
//! LLM judge that asks a chat server for verdicts is with the other judges
//! ([`crate::llm_judge`]).

pub mod client;
pub mod journal;
pub mod sampler;

pub use client::{api_key_from_env, check_base_url, ApiClient, RemoteError};
pub use journal::run_journaled;
pub use sampler::{CompletionRequest, RemoteAnswer, RemoteSampler};
