//! kproxy agent: Kubernetes Services -> eBPF maps.
pub mod agent;
pub mod datapath;
pub mod http;
pub mod manifests;
pub mod metrics;
pub mod sync;
pub mod translate;
pub mod kube;
