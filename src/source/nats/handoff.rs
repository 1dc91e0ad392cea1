//! Handing open pull requests over from a stopping pipeline version to its
//! successor on the same consumer.

use super::request::Request;
use super::*;

/// What a stopping pipeline version hands to its successor on the same
/// consumer: its open pull requests and the messages they delivered that it
/// has not taken. JetStream keeps serving those requests for up to
/// [`PULL_EXPIRES`]; whoever reads them must be the version that is
/// running, or events published just after a reload would meet the old
/// rules.
///
/// A version stopped before its own predecessor handed over passes that
/// predecessor's channel on (`pending`), so back-to-back reloads form a
/// chain that ends at the running version.
pub struct Handoff {
    requests: VecDeque<Request>,
    buffered: VecDeque<Message>,
    pending: Option<mpsc::UnboundedReceiver<Handoff>>,
}

impl Puller {
    /// Stops pulling and gives away the open requests, the messages not
    /// yet taken and the channel of a handoff still to come (see
    /// [`Handoff`]).
    pub fn hand_over(&mut self, pending: Option<mpsc::UnboundedReceiver<Handoff>>) -> Handoff {
        Handoff {
            requests: std::mem::take(&mut self.requests),
            buffered: std::mem::take(&mut self.buffered),
            pending,
        }
    }

    /// Takes over a predecessor's requests and messages; returns the
    /// channel of a handoff still to come, if any.
    pub fn adopt(&mut self, handoff: Handoff) -> Option<mpsc::UnboundedReceiver<Handoff>> {
        self.buffered.extend(handoff.buffered);
        self.requests.extend(handoff.requests);
        handoff.pending
    }
}
