//! cellgate library root: declares the modules; owns no logic of its own.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fleet;
pub mod geo;
pub mod http;
pub mod ids;
pub mod kmerge;
pub mod migrate;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shardmap;
pub mod sqlclass;
pub mod state;
pub mod synth;
pub mod telemetry;
