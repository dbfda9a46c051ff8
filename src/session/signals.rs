//! What a session obeys besides its client and server: pgtenant's shutdown and the
//! console's control channel (PAUSE, RESUME, KILL), as one long-lived future.
//!
//! Why not `watch::Receiver::changed()` in every `select!`: each such future registers with
//! the channel's waiter list when first polled and unregisters when dropped (a lock each),
//! and the relay and the waiter go through their `select!` several times per transaction.
//! Here the wait is registered once and stays registered across polls and attachments; it
//! is rebuilt (one allocation) only after a signal actually arrived. And it is only polled
//! when its own waker fired: polling a registered `Notified` locks its list too, and the
//! session's task is woken for every client and server read.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

use tokio::sync::watch;

use super::registry::Control;

/// A change the session must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// pgtenant is shutting down (reported once).
    Shutdown,
    /// The console changed what the session must do.
    Control(Control),
}

type Pending = Pin<Box<dyn Future<Output = (Receivers, Signal)> + Send>>;

pub struct Signals {
    /// Owns its receivers while it waits; gives them back with the signal.
    pending: Pending,
    /// Clones for reading the current values (reading registers nothing).
    shutdown_now: watch::Receiver<bool>,
    control_now: Option<watch::Receiver<Control>>,
    /// Wakes the session's task when the channels' wait needs another poll.
    wake: Arc<Woken>,
    inner_waker: Waker,
}

/// Set by the channels' waker; the session's task is woken through `task`.
#[derive(Default)]
struct Woken {
    flag: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.task.wake();
    }
}

struct Receivers {
    shutdown: watch::Receiver<bool>,
    control: Option<watch::Receiver<Control>>,
    shutdown_seen: bool,
}

impl Signals {
    pub fn new(shutdown: watch::Receiver<bool>, control: Option<watch::Receiver<Control>>) -> Self {
        let receivers = Receivers {
            shutdown_seen: *shutdown.borrow(),
            shutdown: shutdown.clone(),
            control: control.clone(),
        };
        let wake = Arc::new(Woken::default());
        // The first poll must reach the channels (to register with them).
        wake.flag.store(true, Ordering::Relaxed);
        Signals {
            pending: Box::pin(receivers.next()),
            shutdown_now: shutdown,
            control_now: control,
            inner_waker: Waker::from(wake.clone()),
            wake,
        }
    }

    /// pgtenant is shutting down.
    pub fn draining(&self) -> bool {
        *self.shutdown_now.borrow()
    }

    /// What the console wants now (`Run` without a control channel).
    pub fn control(&self) -> Control {
        self.control_now
            .as_ref()
            .map_or(Control::Run, |c| c.borrow().clone())
    }

    /// The next signal. Cancel-safe: dropping this future keeps the wait registered, and a
    /// signal is never lost (it is returned by the next call).
    pub async fn next(&mut self) -> Signal {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.wake.task.register(cx.waker());
        if !self.wake.flag.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut inner = Context::from_waker(&self.inner_waker);
        match self.pending.as_mut().poll(&mut inner) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((receivers, signal)) => {
                self.pending = Box::pin(receivers.next());
                // The new wait registers with the channels on its first poll.
                self.wake.flag.store(true, Ordering::Release);
                Poll::Ready(signal)
            }
        }
    }
}

impl Receivers {
    async fn next(mut self) -> (Self, Signal) {
        loop {
            tokio::select! {
                biased;
                changed = self.shutdown.changed(), if !self.shutdown_seen => {
                    // A dropped sender means the process is going away: shut down too.
                    if changed.is_err() || *self.shutdown.borrow() {
                        self.shutdown_seen = true;
                        return (self, Signal::Shutdown);
                    }
                }
                changed = control_changed(self.control.as_mut()) => {
                    if changed.is_err() {
                        // The registry is gone with its process: nothing more to obey.
                        self.control = None;
                        continue;
                    }
                    let now = self
                        .control
                        .as_mut()
                        .map_or(Control::Run, |c| c.borrow_and_update().clone());
                    return (self, Signal::Control(now));
                }
            }
        }
    }
}

/// Resolves when the control channel changes; never without one.
async fn control_changed(
    control: Option<&mut watch::Receiver<Control>>,
) -> Result<(), watch::error::RecvError> {
    match control {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn signals_arrive_once_each_and_survive_cancelled_waits() {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (control_tx, control_rx) = watch::channel(Control::Run);
        let mut signals = Signals::new(shutdown_rx, Some(control_rx));
        assert!(!signals.draining());
        assert_eq!(signals.control(), Control::Run);
        // A wait that is cancelled before anything happens loses nothing.
        let waited = tokio::time::timeout(Duration::from_millis(20), signals.next()).await;
        assert!(waited.is_err());
        control_tx.send(Control::Paused).unwrap();
        assert_eq!(signals.next().await, Signal::Control(Control::Paused));
        assert_eq!(signals.control(), Control::Paused);
        shutdown_tx.send(true).unwrap();
        assert_eq!(signals.next().await, Signal::Shutdown);
        assert!(signals.draining());
        control_tx.send(Control::Kill(Arc::from("bye"))).unwrap();
        assert_eq!(
            signals.next().await,
            Signal::Control(Control::Kill(Arc::from("bye")))
        );
        // Shutdown is reported once; with the control channel gone nothing more comes.
        drop(control_tx);
        let waited = tokio::time::timeout(Duration::from_millis(20), signals.next()).await;
        assert!(waited.is_err());
    }
}
