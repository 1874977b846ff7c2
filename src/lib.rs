//! cellgate library root: declares the modules; owns no logic of its own.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod dataplane;
pub mod demo;
pub mod error;
pub mod etcd;
pub mod fleet;
pub mod geo;
pub mod http;
pub mod ids;
pub mod kmerge;
pub mod listen_tls;
pub mod locate;
pub mod migrate;
pub mod reload;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod shardmap;
pub mod sqlclass;
pub mod state;
pub mod synth;
pub mod tasks;
pub mod telemetry;
