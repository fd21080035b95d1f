//! The drain: for a console captured `always`, the broker keeps the port
//! open between sessions and records what the board prints, so a boot log
//! printed between flashing and monitoring is kept. A session that starts
//! takes the open port over (no close, so no DTR/RTS toggle and no lost
//! bytes) and hands it back when it ends.

use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_serial::SerialStream;

use crate::capture::Capture;

/// A session asking for the drained port.
pub type Handover = oneshot::Sender<SerialStream>;

/// Reads the port into `capture` until a session asks for the port (it gets
/// it through the handover) or the port fails.
pub async fn run(
    mut port: SerialStream,
    capture: Arc<Capture>,
    mut asks: mpsc::Receiver<Handover>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            give = asks.recv() => {
                if let Some(give) = give {
                    let _ = give.send(port);
                }
                return;
            }
            r = port.read(&mut buf) => match r {
                Ok(n) if n > 0 => capture.record(&buf[..n]),
                _ => return,
            },
        }
    }
}
