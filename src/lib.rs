//! cellgate library root: declares the modules; owns no logic of its own.
#![forbid(unsafe_code)]

pub mod cli;
pub mod geo;
pub mod ids;
pub mod routing;
pub mod shardmap;
pub mod synth;
