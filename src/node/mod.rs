//! A node: its connections and preparation (`walsync init`).

pub mod connect;
pub mod fence;
pub mod pgbin;
pub mod rights;
pub mod setup;
pub mod slots;
pub mod tls;
