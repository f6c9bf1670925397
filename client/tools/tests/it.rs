//! The tools' integration tests (dump, corpus, load generator) in one binary (one link, not 4): each file of this directory is
//! a module here, its name the filter, e.g. `cargo test --test it -- bench_cli::`.

mod common;

#[path = "bench_cli.rs"]
mod bench_cli;
#[path = "dump.rs"]
mod dump;
#[path = "dump_corpus.rs"]
mod dump_corpus;
#[path = "dump_memory.rs"]
mod dump_memory;
