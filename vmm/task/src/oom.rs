//! OOM kills of the guest's containers, kept for the host to wait on: containerd learns
//! of them from the host's Task service, which asks the agent's `WaitOom`.

use std::collections::HashMap;
use std::sync::Mutex;

use kuasar_sandbox::oom::OomReceiver;
use tokio::sync::watch;

/// The OOM kills of one container so far, and whether it is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Kills {
    count: u64,
    gone: bool,
}

/// Every container's OOM kills.
#[derive(Debug, Default)]
pub struct OomEvents {
    containers: Mutex<HashMap<String, watch::Sender<Kills>>>,
}

impl OomEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Kills>>> {
        self.containers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts the kills `receiver` reports for container `id`.
    pub fn watch(&self, id: &str, mut receiver: OomReceiver) {
        let (sender, _) = watch::channel(Kills::default());
        self.lock().insert(id.to_string(), sender.clone());
        tokio::spawn(async move {
            while receiver.recv().await.is_some() {
                sender.send_modify(|kills| kills.count += 1);
            }
        });
    }

    /// Ends the waits for container `id`, which is deleted.
    pub fn remove(&self, id: &str) {
        if let Some(sender) = self.lock().remove(id) {
            sender.send_modify(|kills| kills.gone = true);
        }
    }

    /// Waits until container `id` has had more than `seen` kills and returns their
    /// number; `None` once the container is gone or was never watched.
    pub async fn wait(&self, id: &str, seen: u64) -> Option<u64> {
        let mut receiver = self.lock().get(id)?.subscribe();
        loop {
            let kills = *receiver.borrow_and_update();
            if kills.count > seen {
                return Some(kills.count);
            }
            if kills.gone {
                return None;
            }
            receiver.changed().await.ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kills_are_counted_and_deletion_ends_the_wait() {
        let events = std::sync::Arc::new(OomEvents::default());
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        events.watch("c1", receiver);
        sender.send(()).unwrap();
        assert_eq!(events.wait("c1", 0).await, Some(1));

        let waiting = tokio::spawn({
            let events = events.clone();
            async move { events.wait("c1", 1).await }
        });
        sender.send(()).unwrap();
        assert_eq!(waiting.await.unwrap(), Some(2));

        let waiting = tokio::spawn({
            let events = events.clone();
            async move { events.wait("c1", 2).await }
        });
        tokio::task::yield_now().await;
        events.remove("c1");
        assert_eq!(waiting.await.unwrap(), None);
        assert_eq!(events.wait("unknown", 0).await, None);
    }
}
