//! A conversation as `sb` takes it on the command line: its number (what `sb conv list`
//! shows) or its title (a group's title, or for a direct conversation the other
//! member's name), looked up among the caller's conversations. A title matches
//! whatever its ASCII letter case. A user's name means the direct conversation with that
//! user where there is one, whatever groups share the title (anyone can add anyone to
//! a group of any title: a stranger's group titled "bob" made `sb send bob` refuse, or,
//! with no direct conversation, go to it). Two or more groups matching are refused with
//! their numbers, never guessed. A title made only of digits reads as a number.
//!
//! What writes or tells its members something (`send`, `edit`, `delete`, `read`,
//! `upload --conv`, `file send`, `typing`) takes a group by its title only where the
//! title cannot be a user's name: with no direct conversation with bob, a stranger's
//! group titled "bob" took `sb send bob secret` (a review), so a group whose title has a
//! name's shape is given by its number for a write. Owning the group is no
//! exception: ownership is handed over without consent, and admins rename groups.

use switchboard_client::Client;
use switchboard_protocol::{ConvId, ConversationKind, ConversationSummary};

/// The help of a conversation argument.
pub const HELP: &str = "The conversation: its number, or its title (a direct one: the other member's name; a title of digits only: give its number)";

/// A conversation named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvArg {
    /// Its number.
    Id(ConvId),
    /// Its title, or a direct conversation's other member.
    Title(String),
}

impl ConvArg {
    /// The clap value parser: ASCII digits are a number, anything else a title.
    pub fn parse(s: &str) -> Result<ConvArg, String> {
        if s.is_empty() {
            return Err("a conversation is given by its number or its title".into());
        }
        match s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse()) {
            Some(Ok(id)) => Ok(ConvArg::Id(id)),
            Some(Err(_)) => Err(format!("{s} is no conversation's number")),
            None => Ok(ConvArg::Title(s.to_owned())),
        }
    }

    /// The conversation's number: a title is looked up among `client`'s conversations
    /// (one `ListConversations` walk), and what it was taken for is said on standard
    /// error (`"team" is conversation 12, a group`). Errors: no conversation of the
    /// caller's has that title, or several do (each listed with its number).
    pub async fn resolve(&self, client: &Client) -> anyhow::Result<ConvId> {
        self.resolve_by(client, pick).await
    }

    /// `resolve` for what writes into the conversation (`pick_to_write`'s rule).
    pub async fn resolve_to_write(&self, client: &Client) -> anyhow::Result<ConvId> {
        self.resolve_by(client, pick_to_write).await
    }

    /// `resolve` for what only a group takes (adding, removing, roles, renaming,
    /// leaving): a title names one of the caller's groups, never the direct conversation
    /// with a user of that name (where a title is shared, those were refused or went to
    /// the direct one, which refuses them).
    pub async fn resolve_group(&self, client: &Client) -> anyhow::Result<ConvId> {
        self.resolve_by(client, pick_group).await
    }

    /// `resolve_to_write` among `convs`, the caller's conversations.
    pub fn among_to_write(&self, convs: &[ConversationSummary]) -> anyhow::Result<ConvId> {
        self.among_by(convs, pick_to_write)
    }

    async fn resolve_by(&self, client: &Client, how: Pick) -> anyhow::Result<ConvId> {
        match self {
            ConvArg::Id(id) => Ok(*id),
            ConvArg::Title(_) => self.among_by(&client.conversations().await?, how),
        }
    }

    /// The number, or the conversation of `convs` that `how` takes the title for (said
    /// on standard error).
    fn among_by(&self, convs: &[ConversationSummary], how: Pick) -> anyhow::Result<ConvId> {
        match self {
            ConvArg::Id(id) => Ok(*id),
            ConvArg::Title(title) => {
                let found = how(title, convs)?;
                say_taken(title, found);
                Ok(found.id)
            }
        }
    }
}

/// How a title is looked up among the caller's conversations: `pick` (any),
/// `pick_to_write`, `pick_group`.
type Pick = for<'a> fn(&str, &'a [ConversationSummary]) -> anyhow::Result<&'a ConversationSummary>;

impl std::fmt::Display for ConvArg {
    /// As given: the number, or the title.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvArg::Id(id) => write!(f, "{id}"),
            ConvArg::Title(title) => write!(f, "{title}"),
        }
    }
}

/// Says on standard error what a title was taken for (errors are made safe where they
/// are printed; this line here).
fn say_taken(title: &str, found: &ConversationSummary) {
    eprintln!("{}", crate::terminal_safe(&format!("\"{title}\" is conversation {}", describe(found))));
}

/// `12, a group titled "team"` or `4, the direct one with bob`.
fn describe(c: &ConversationSummary) -> String {
    match c.kind {
        ConversationKind::Direct => format!("{}, the direct one with {}", c.id, c.title),
        ConversationKind::Group => format!("{}, a group titled \"{}\"", c.id, c.title),
    }
}

/// `pick` among the groups of `convs`: a title names a group, never the direct
/// conversation with a user of that name, and a name that only a direct conversation
/// goes by says so (a trial got "none of my conversations is titled bob" with a direct
/// conversation with bob there).
pub fn pick_group<'a>(title: &str, convs: &'a [ConversationSummary]) -> anyhow::Result<&'a ConversationSummary> {
    let groups: Vec<ConversationSummary> =
        convs.iter().filter(|c| c.kind == ConversationKind::Group).cloned().collect();
    let picked = pick(title, &groups).map(|c| c.id);
    // Only where no group goes by it: several groups and a direct conversation going by
    // one title were refused as "the direct conversation" (a review), not with the
    // groups' numbers.
    let no_group = !groups.iter().any(|c| c.title.eq_ignore_ascii_case(title));
    let direct = convs.iter().find(|c| c.kind == ConversationKind::Direct && c.title.eq_ignore_ascii_case(title));
    match (picked, direct) {
        (Ok(id), _) => convs.iter().find(|c| c.id == id).ok_or_else(|| anyhow::anyhow!("conversation {id} vanished")),
        // `INVALID`, as the broker refuses a group's command on a direct conversation
        // (status 5; it was 1: a trial).
        (Err(_), Some(direct)) if no_group => Err(crate::Refused(
            switchboard_protocol::ErrorCode::INVALID,
            format!(
                "{title:?} is the direct conversation with {} ({}): this command takes a group (its number or title)",
                direct.title, direct.id
            ),
        )
        .into()),
        (Err(e), _) => Err(e),
    }
}

/// `pick` for a write: a group found by a title that could be a user's name (the title
/// in lower case a valid user name: 1-64 of `a-z 0-9 _ . -`), with no direct conversation
/// going by it, is refused with both ways on (its number, or starting the direct one).
/// Anyone may add anyone to a group of any title, so the name of a user the caller has
/// not written to yet would otherwise send to whoever named a group after that user; and
/// being its owner proves nothing (before, owners were let through: a stranger can hand
/// a group over and stay an admin, who may rename it).
pub fn pick_to_write<'a>(title: &str, convs: &'a [ConversationSummary]) -> anyhow::Result<&'a ConversationSummary> {
    let found = pick(title, convs)?;
    if found.kind == ConversationKind::Group && could_be_user_name(title) {
        let name = title.to_ascii_lowercase();
        return Err(crate::Refused::not_found(format!(
            "{title:?} is conversation {}, and could be the user {name}, with whom I have no direct conversation: give the group's number to write there, or `sb conv create {name}` to start one with the user",
            describe(found)
        ))
        .into());
    }
    Ok(found)
}

/// Whether `title` in lower case is a valid user name (the broker's `check_user_name`:
/// 1-64 bytes of `a-z 0-9 _ . -`); user names match titles whatever their ASCII case.
fn could_be_user_name(title: &str) -> bool {
    !title.is_empty()
        && title.len() <= switchboard_protocol::limits::MAX_NAME_BYTES as usize
        && title.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The one of `convs` whose title is `title`, whatever its ASCII letter case (user names
/// and titles differing only in case are likely one person or team to whoever types
/// them; other characters must match as they are, so a title of look-alikes, such as
/// the Kelvin sign for K, is not taken for a name):
/// the direct conversation with a user of that name if there is one (a user's name is
/// unique, a group's title is not), else the one group.
pub fn pick<'a>(title: &str, convs: &'a [ConversationSummary]) -> anyhow::Result<&'a ConversationSummary> {
    let mut found: Vec<&ConversationSummary> = convs.iter().filter(|c| c.title.eq_ignore_ascii_case(title)).collect();
    if found.iter().any(|c| c.kind == ConversationKind::Direct) {
        found.retain(|c| c.kind == ConversationKind::Direct);
    }
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(crate::Refused::not_found(format!(
            "none of my conversations is titled {title:?} or is a direct one with a user of that name (`sb conv list` shows them; `sb conv create NAME` starts a direct one)"
        ))
        .into()),
        several => {
            let which: Vec<String> = several.iter().map(|c| describe(c)).collect();
            // A conflict (exit status 4; a user's trial: 1).
            let why = format!("several conversations go by {title:?}: {}; give its number", which.join("; "));
            Err(crate::Refused(switchboard_protocol::ErrorCode::CONFLICT, why).into())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use switchboard_protocol::Role;

    fn conv(id: ConvId, kind: ConversationKind, title: &str) -> ConversationSummary {
        ConversationSummary { id, kind, title: title.into(), last_seq: 0, member_count: 2, my_role: Role::Member }
    }

    #[test]
    fn a_conversation_is_named_by_its_number_or_its_title() {
        assert_eq!(ConvArg::parse("12").unwrap(), ConvArg::Id(12));
        assert_eq!(ConvArg::parse("team").unwrap(), ConvArg::Title("team".into()));
        // Only digits make a number (`+7` was read as 7).
        assert_eq!(ConvArg::parse("+7").unwrap(), ConvArg::Title("+7".into()));
        assert!(ConvArg::parse("99999999999999999999999").is_err());
        assert!(ConvArg::parse("").is_err());
        let convs = [
            conv(3, ConversationKind::Group, "team"),
            conv(4, ConversationKind::Direct, "bob"),
            conv(5, ConversationKind::Group, "Trip"),
            conv(6, ConversationKind::Group, "trip"),
            conv(7, ConversationKind::Group, "Ops"),
            conv(8, ConversationKind::Group, "Dave"),
            conv(9, ConversationKind::Direct, "dave"),
        ];
        let id = |title| pick(title, &convs).map(|c| c.id);
        assert_eq!(id("team").unwrap(), 3);
        // A direct conversation goes by the other member's name.
        assert_eq!(id("bob").unwrap(), 4);
        assert_eq!(id("ops").unwrap(), 7);
        // Several groups, whatever the case, are refused.
        let several = id("trip").unwrap_err().to_string();
        assert!(several.contains("5, a group titled \"Trip\"; 6, a group titled \"trip\""), "{several}");
        // A user's name is the direct conversation with that user: a trial's "Dave" went
        // to a group dave was not in, and a stranger's group titled so made it refused.
        assert_eq!(id("Dave").unwrap(), 9);
        // ASCII case only: a look-alike title is no name.
        let kelvin = [conv(10, ConversationKind::Group, "\u{212a}ate")];
        assert!(pick("kate", &kelvin).is_err());
        assert_eq!(pick("\u{212a}ate", &kelvin).unwrap().id, 10);
        // Group commands look among groups only, and say so for a user's name.
        assert_eq!(pick_group("Dave", &convs).unwrap().id, 8);
        let direct = pick_group("bob", &convs).unwrap_err().to_string();
        assert!(direct.contains("\"bob\" is the direct conversation with bob (4)"), "{direct}");
        // Several groups beside a direct conversation: the groups' numbers.
        let several = [
            conv(11, ConversationKind::Group, "eve"),
            conv(12, ConversationKind::Group, "Eve"),
            conv(13, ConversationKind::Direct, "eve"),
        ];
        let groups = pick_group("eve", &several).unwrap_err().to_string();
        assert!(groups.contains("11, a group titled \"eve\"; 12, a group titled \"Eve\""), "{groups}");
        let none = id("carol").unwrap_err().to_string();
        assert!(none.contains("sb conv list") && none.contains("sb conv create NAME"), "{none}");
    }

    #[test]
    fn a_write_takes_no_group_by_a_name_shaped_title() {
        let owned =
            |id, title: &str| ConversationSummary { my_role: Role::Owner, ..conv(id, ConversationKind::Group, title) };
        let convs = [
            // A stranger's group named after a user I have no direct conversation with.
            conv(3, ConversationKind::Group, "bob"),
            conv(4, ConversationKind::Direct, "carol"),
            conv(5, ConversationKind::Group, "carol"),
            conv(6, ConversationKind::Group, "Trip 2026"),
            owned(7, "team"),
        ];
        let write = |title| pick_to_write(title, &convs).map(|c| c.id);
        // Before: group 3, and the message went to whoever named it.
        let refused = write("Bob").unwrap_err().to_string();
        assert!(refused.contains("3, a group titled \"bob\"") && refused.contains("sb conv create bob"), "{refused}");
        // Reads still take it; a direct conversation still wins; a title no user can
        // have is taken.
        assert_eq!(pick("bob", &convs).unwrap().id, 3);
        assert_eq!(write("carol").unwrap(), 4);
        assert_eq!(write("trip 2026").unwrap(), 6);
        // Owning it proves nothing: a group can be handed over, and admins rename.
        assert!(write("team").is_err());
        assert!(could_be_user_name("a.b-c_9") && !could_be_user_name("") && !could_be_user_name(&"x".repeat(65)));
    }
}
