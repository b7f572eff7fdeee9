//! Empty on the host: lets proxy-agent depend on this crate at build time so
//! cargo rebuilds the agent when the datapath changes (aya-template pattern).
#![no_std]
