//! One module per subcommand: argument struct + `run`.

pub mod apo;
pub mod bench;
pub mod demo;
pub mod generate;
pub mod init;
pub mod score;
pub mod simulate;
pub mod tasks;
pub mod train;
