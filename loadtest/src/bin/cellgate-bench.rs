//! cellgate-bench: the benchmark runner (direct vs proxied point-read pairs, 100k concurrent
//! streams, latency with 100k streams open). See loadtest/bench/README.md; the code is in
//! loadtest/src/bench/.

#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}
