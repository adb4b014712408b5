//! The C ABI: `extern "C"` functions that convert arguments and delegate to the
//! async core. No protocol logic lives here. `include/webpubsub_client.h` is generated
//! from this module by cbindgen (see `build.rs`).
//!
//! Names follow the C conventions (`wps_client`), hence the lint exception.
#![allow(non_camel_case_types)]

pub mod callbacks;
pub mod client;
pub mod credential;
pub mod gate;
pub mod interrupt;
pub mod options;
pub mod status;

mod backlog;
mod convert;
mod dispatcher;
mod log;
mod panic;
mod park;
