//! Status: what one node's operators and monitors see, in one place. The link runners
//! write their state and heartbeat ([`link`]), one report reads it back with the slots,
//! conflicts, parked rows and sequences ([`report`]), and `walsync status`, `/metrics`
//! and `/readyz` ([`metrics`]) all show that report. It depends on nothing above it: the
//! runtime writes through it, the command line and the HTTP endpoint read through it.

pub mod link;
pub mod metrics;
pub mod report;
