//! A conversation as `sb` takes it on the command line: its number (what `sb conv list`
//! shows) or its title (a group's title, or for a direct conversation the other
//! member's name), looked up among the caller's conversations.

use anyhow::bail;
use switchboard_client::Client;
use switchboard_protocol::{ConvId, ConversationKind, ConversationSummary};

/// A conversation named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvArg {
    /// Its number.
    Id(ConvId),
    /// Its title, or a direct conversation's other member.
    Title(String),
}

impl ConvArg {
    /// The clap value parser: digits are a number, anything else a title.
    pub fn parse(s: &str) -> Result<ConvArg, String> {
        if s.is_empty() {
            return Err("a conversation is given by its number or its title".into());
        }
        Ok(s.parse().map_or_else(|_| ConvArg::Title(s.to_owned()), ConvArg::Id))
    }

    /// The conversation's number: a title is looked up among `client`'s conversations
    /// (one `ListConversations` walk). Errors: no conversation of the caller's has that
    /// title, or several do (each listed with its number).
    pub async fn resolve(&self, client: &Client) -> anyhow::Result<ConvId> {
        match self {
            ConvArg::Id(id) => Ok(*id),
            ConvArg::Title(title) => pick(title, &client.conversations().await?),
        }
    }
}

/// The one of `convs` titled `title`: an exact match first, else the one whose title
/// differs only in letter case.
pub fn pick(title: &str, convs: &[ConversationSummary]) -> anyhow::Result<ConvId> {
    let exact: Vec<&ConversationSummary> = convs.iter().filter(|c| c.title == title).collect();
    let found = if exact.is_empty() {
        convs.iter().filter(|c| c.title.to_lowercase() == title.to_lowercase()).collect()
    } else {
        exact
    };
    match found.as_slice() {
        [one] => Ok(one.id),
        [] => bail!(
            "none of my conversations is titled {title:?} or is a direct one with a user of that name (`sb conv list` shows them)"
        ),
        several => {
            let which: Vec<String> = several
                .iter()
                .map(|c| match c.kind {
                    ConversationKind::Direct => format!("{} (direct with {})", c.id, c.title),
                    ConversationKind::Group => format!("{} (group {:?})", c.id, c.title),
                })
                .collect();
            bail!("several conversations are titled {title:?}: {}; give its number", which.join(", "))
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
        assert!(ConvArg::parse("").is_err());
        let convs = [
            conv(3, ConversationKind::Group, "team"),
            conv(4, ConversationKind::Direct, "bob"),
            conv(5, ConversationKind::Group, "Trip"),
            conv(6, ConversationKind::Group, "trip"),
            conv(7, ConversationKind::Group, "Ops"),
        ];
        assert_eq!(pick("team", &convs).unwrap(), 3);
        // A direct conversation goes by the other member's name.
        assert_eq!(pick("bob", &convs).unwrap(), 4);
        // The exact title first; letter case only when nothing matches exactly.
        assert_eq!(pick("trip", &convs).unwrap(), 6);
        assert_eq!(pick("ops", &convs).unwrap(), 7);
        let several = pick("TRIP", &convs).unwrap_err().to_string();
        assert!(several.contains("5 (group \"Trip\"), 6 (group \"trip\")"), "{several}");
        let none = pick("carol", &convs).unwrap_err().to_string();
        assert!(none.contains("sb conv list"), "{none}");
    }
}
