//! Kubernetes mode (see issue: watch Services, EndpointSlices and Nodes).
use std::{path::Path, time::Duration};

use crate::{agent::Agent, metrics::Metrics};

pub async fn run(_agent: &mut Agent, _kubeconfig: Option<&Path>, _metrics: &Metrics, _poll: Duration) -> anyhow::Result<()> {
    anyhow::bail!("Kubernetes mode is not implemented yet; use --manifests DIR")
}
