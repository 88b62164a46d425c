//! Conversations: `state.rs` holds every rule and ordering as a pure state machine
//! (with `receipts.rs`, its members' receipt watermarks), `actor.rs` drives it (one actor per active conversation), `directory.rs` finds or
//! starts the actor of a conversation. `harness.rs` (tests only) drives the state with
//! an in-memory log, a virtual clock and a crash switch.

mod actor;
mod directory;
#[cfg(test)]
mod harness;
mod receipts;
mod state;

pub use actor::{ConvMsg, MarkReply};
pub use directory::{ConvDirectory, HandedMarks, Share};
pub use receipts::Marks;
pub(crate) use state::check_files;
pub use state::{Caller, Command, ConversationState, Effect, Log, Mark, Read, not_a_member, replay_audiences};
