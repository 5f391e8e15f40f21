//! prefopt-model's integration tests, one binary (one link step) with a module per area and
//! shared helpers in `util`. `PREFOPT_TEST_DEVICE=cuda` runs the model, generation and bf16
//! tests on a GPU (a build with the `cuda` feature); the default is the CPU.

mod bf16;
mod fuzz;
mod generate;
mod hf_models;
mod lora;
mod ops;
mod precision;
mod util;
