//! Prometheus metrics on the admin listener (`GET /metrics`): a generic writer
//! of the text exposition format (`exposition`) and blockrep's catalogue of
//! metrics over it (`catalog`).

mod catalog;
mod exposition;
mod launches;
mod upload;
mod workflow;

pub(crate) use catalog::handler;
