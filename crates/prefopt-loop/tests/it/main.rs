//! prefopt-loop's integration tests, one binary with a module per area and shared helpers in
//! `util`.

mod apo_loop;
mod apo_lora;
mod fake_server;
mod llm_judge;
mod remote_sampler;
mod tabular_limit;
mod util;
