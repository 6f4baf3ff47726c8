//! An agent serving on a runtime of its own, for programs that are not
//! async (`tessera run`'s private agent, `tessera mount`, tests).

use std::sync::Arc;
use std::time::Duration;

use crate::{Agent, Bound, Error};

/// A running agent and the runtime it runs on; stopped by [`Background::stop`]
/// (or on drop).
pub struct Background {
    agent: Arc<Agent>,
    bound: Bound,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<Result<(), Error>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Background {
    /// Starts `agent` serving on a new runtime; returns once it listens.
    pub fn start(agent: Agent) -> Result<Background, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .max_blocking_threads(64)
            .thread_name("tessera-agent")
            .build()
            .map_err(|source| Error::Listen { addr: "a runtime for the agent".into(), source })?;
        let agent = Arc::new(agent);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Bound>();
        let serving = runtime.spawn(agent.clone().run(
            move |bound| {
                let _ = ready_tx.send(bound.clone());
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let mut me = Background { agent, bound: Bound::default(), stop: Some(stop), serving: Some(serving), runtime: Some(runtime) };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(bound) => {
                me.bound = bound;
                Ok(me)
            }
            // It failed to listen: say why.
            Err(_) => Err(me
                .finish()
                .err()
                .unwrap_or_else(|| Error::Listen { addr: "the agent's listeners".into(), source: std::io::Error::other("did not start within 30 s") })),
        }
    }

    /// The agent.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Where it listens.
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// Stops serving, flushes overlays, waits for the caches to be written.
    pub fn stop(mut self) -> Result<(), Error> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (Some(runtime), Some(serving)) = (self.runtime.take(), self.serving.take()) else { return Ok(()) };
        let result = runtime.block_on(serving);
        runtime.shutdown_background();
        result.unwrap_or(Ok(()))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
