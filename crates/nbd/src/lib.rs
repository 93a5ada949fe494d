//! An async server for the Network Block Device (NBD) protocol.
//!
//! This first layer, [`wire`], parses and encodes the protocol's headers with
//! no I/O, so that it can be tested and fuzzed on its own.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod wire;
