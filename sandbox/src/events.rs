//! Task events, published to containerd's event service the way a shim publishes them.

use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageFull;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use containerd_shim_protos::topics;
use tokio::sync::mpsc;

/// Events queued while containerd is unreachable; older ones are dropped beyond this.
const QUEUE_DEPTH: usize = 1024;

/// A task event, with the namespace of the container it concerns.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    /// A container's init process was created.
    Create(TaskCreate),
    /// A container's init process started.
    Start(TaskStart),
    /// A process exited.
    Exit(TaskExit),
    /// A container was deleted.
    Delete(TaskDelete),
    /// An exec process was added to a container.
    ExecAdded(TaskExecAdded),
    /// An exec process started.
    ExecStarted(TaskExecStarted),
    /// A container hit its memory limit.
    Oom(TaskOOM),
    /// A container was paused.
    Paused(TaskPaused),
    /// A container was resumed.
    Resumed(TaskResumed),
}

impl TaskEvent {
    fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            TaskEvent::Start(_) => topics::TASK_START_EVENT_TOPIC,
            TaskEvent::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            TaskEvent::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            TaskEvent::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskEvent::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskEvent::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
            TaskEvent::Paused(_) => topics::TASK_PAUSED_EVENT_TOPIC,
            TaskEvent::Resumed(_) => topics::TASK_RESUMED_EVENT_TOPIC,
        }
    }

    fn to_any(&self) -> Any {
        fn pack<M: MessageFull>(message: &M) -> Any {
            let mut any = Any::new();
            any.type_url = M::descriptor().full_name().to_string();
            any.value = message.write_to_bytes().unwrap_or_default();
            any
        }
        match self {
            TaskEvent::Create(e) => pack(e),
            TaskEvent::Start(e) => pack(e),
            TaskEvent::Exit(e) => pack(e),
            TaskEvent::Delete(e) => pack(e),
            TaskEvent::ExecAdded(e) => pack(e),
            TaskEvent::ExecStarted(e) => pack(e),
            TaskEvent::Oom(e) => pack(e),
            TaskEvent::Paused(e) => pack(e),
            TaskEvent::Resumed(e) => pack(e),
        }
    }
}

/// Sends task events to containerd's ttrpc socket, in order, reconnecting as needed.
///
/// Publishing never blocks a task operation: events are queued and forwarded by a
/// background task; when containerd is down, they wait in the queue.
#[derive(Clone, Debug)]
pub struct EventPublisher {
    queue: mpsc::Sender<(String, TaskEvent)>,
}

impl EventPublisher {
    /// Starts forwarding to containerd's ttrpc socket at `address`.
    pub fn start(address: PathBuf) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(forward(address, receiver));
        Self { queue }
    }

    /// A publisher whose events go nowhere, for sandboxers run without containerd.
    pub fn discard() -> Self {
        let (queue, mut receiver) = mpsc::channel::<(String, TaskEvent)>(QUEUE_DEPTH);
        tokio::spawn(async move { while receiver.recv().await.is_some() {} });
        Self { queue }
    }

    /// Queues `event` of a container in containerd `namespace`.
    pub fn publish(&self, namespace: &str, event: TaskEvent) {
        if let Err(err) = self.queue.try_send((namespace.to_string(), event)) {
            tracing::warn!(error = %err, "task event dropped: queue full");
        }
    }
}

async fn forward(address: PathBuf, mut receiver: mpsc::Receiver<(String, TaskEvent)>) {
    let socket = format!("unix://{}", address.display());
    let mut client: Option<EventsClient> = None;
    while let Some((namespace, event)) = receiver.recv().await {
        let mut envelope = Envelope::new();
        envelope.timestamp = Some(timestamp(SystemTime::now())).into();
        envelope.namespace = namespace;
        envelope.topic = event.topic().to_string();
        envelope.event = Some(event.to_any()).into();
        let mut request = ForwardRequest::new();
        request.envelope = Some(envelope).into();

        for attempt in 0..5u32 {
            if client.is_none() {
                match ttrpc::asynchronous::Client::connect(&socket).await {
                    Ok(c) => client = Some(EventsClient::new(c)),
                    Err(err) => {
                        tracing::debug!(address = %address.display(), error = %err, "connect to containerd events");
                    }
                }
            }
            if let Some(events) = &client {
                let context = ttrpc::context::with_timeout(5_000_000_000);
                match events.forward(context, &request).await {
                    Ok(_) => break,
                    Err(err) => {
                        tracing::debug!(error = %err, "forward task event");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
            if attempt == 4 {
                tracing::warn!(topic = %request.envelope.topic, address = %address.display(), "task event dropped: containerd unreachable");
            }
        }
    }
}

/// Converts a wall-clock time into a protobuf timestamp.
pub fn timestamp(time: SystemTime) -> Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = since_epoch.as_secs() as i64;
    ts.nanos = since_epoch.subsec_nanos() as i32;
    ts
}
