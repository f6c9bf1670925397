//! End-to-end tests of logitd live in `tests/`: they use the server and the client crates together.
