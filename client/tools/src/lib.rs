//! logitd-client-tools: the command-line tools of the logitd client, on top
//! of the [`logitd_client`] library.
//!
//! - `logitd-client dump` ([`dump`]): the teacher targets of a whole corpus
//!   to shards, resumable and split across workers.
//! - `logitd-bench`: a closed-loop load generator for a logitd server.
//! - [`corpus`]: token corpora as JSON lines or Parquet, streamed (the input
//!   of both).
//!
//! The library crate stays free of the tools' dependencies (clap, indicatif,
//! glob, the Parquet corpus reader, anyhow, tracing-subscriber); errors here
//! are typed ([`corpus::CorpusError`], [`dump::DumpError`]), and only the
//! binaries turn them into `anyhow` reports.

pub mod corpus;
pub mod dump;
