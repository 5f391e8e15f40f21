//! Tensors in, logits out: prefopt's own trainable Llama-family transformer on candle,
//! Hugging Face folder loading and saving, LoRA adapters in PEFT's layout and stacks of
//! them (`lora`, `stack`), and sampling with a KV cache (`generate`).
//!
//! Not here: tokenizers and data (`prefopt-data`), losses and training (`prefopt-train`).
//! The model code is ours rather than candle-transformers' because those models use fused
//! kernels without a backward pass, which would silently drop gradients.

pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod hf;
pub mod hub;
pub mod init;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod params;
pub mod process;
pub mod reward;
pub mod stack;

pub use config::LlamaConfig;
pub use device::{device_name, parse_device, DEVICE_HELP};
pub use error::{ModelError, Result};
pub use generate::{generate, sample_rng, Generated, SamplingParams};
pub use hf::{copy_tokenizer_files, fill_model_dir, save_model_dir, HfModel};
pub use hub::resolve_model;
pub use init::init_params;
pub use llama::{parameter_shapes, AdapterUse, Checkpoints, Dropout, KvCache, Llama, Mode, Precision};
pub use lora::{LoraAdapter, LoraConfig, TargetModules};
pub use params::Params;
pub use reward::{pooled_rewards, reward_position, RewardWeights};
pub use stack::{Policy, StackEntry};
