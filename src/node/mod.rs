//! A node: its names, connections and preparation (`walsync init`).

pub mod names;
pub mod connect;
pub mod setup;
