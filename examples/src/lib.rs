//! Shared parts of the examples: the greeter backend (with health and
//! graceful, deregister-first shutdown) and a call-counting driver.
//!
//! | item | job |
//! | --- | --- |
//! | [`greeter`] | the greeter backend |
//! | [`drive`] | make N calls through a channel and count where they went |

pub mod drive;
pub mod greeter;
