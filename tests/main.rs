//! The integration tests, in one binary: each file is a module, built and
//! linked once instead of once per file.

mod common;

mod cli;
mod host_api;
mod host_cases;
mod host_e2e;
mod imaging_cases;
mod imaging_reference;
mod serve_journal;
mod serve_memory;
mod serve_sandbox;
mod store_s3;
