//! walsync keeps several PostgreSQL databases in sync in both directions.
//!
//! The pipeline, per link `A -> B`: [`stream`] reads A's logical slot (pgoutput),
//! [`pgoutput`] decodes the bytes into messages, [`merge`] decides per transaction what
//! B must do (origin filter, walsync's own tables dropped) and [`apply`] runs it in one
//! B transaction tagged with the author's replication origin, with the link's progress
//! recorded in that same transaction. [`runtime`] supervises the links of one sidecar.
//!
//! Pure modules (no I/O): [`pgoutput`], [`merge`], [`lsn`], [`config`] (parsing).

pub mod advice;
pub mod apply;
pub mod cli;
pub mod config;
pub mod ddl;
pub mod dsn;
pub mod lsn;
pub mod merge;
pub mod names;
pub mod node;
pub mod observability;
pub mod pgoutput;
pub mod runtime;
pub mod sequences;
pub mod spool;
pub mod sql_error;
pub mod status;
pub mod stream;
