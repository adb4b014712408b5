//! Hub and group names the service accepts. The rules are the REST API's path patterns
//! (specification `webpubsub/data-plane`, 2024-12-01); that the client endpoint and
//! the client protocol apply the same ones is the emulator's assumption.

/// Longest group name accepted.
pub(crate) const MAX_GROUP_NAME: usize = 1024;
/// Longest hub name accepted.
pub(crate) const MAX_HUB_NAME: usize = 128;

/// Checks a hub name against ``^[A-Za-z][A-Za-z0-9_`,.[\]]{0,127}$``; the error is
/// the BadRequest message.
pub(crate) fn validate_hub(hub: &str) -> Result<(), String> {
    let mut chars = hub.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_`,.[]".contains(c));
    if first_ok && rest_ok && hub.len() <= MAX_HUB_NAME {
        Ok(())
    } else {
        Err(format!(
            "Invalid hub name '{hub}': it starts with a letter and has at most {MAX_HUB_NAME} letters, digits and _`,.[]"
        ))
    }
}

/// Checks a group name: 1 to 1024 characters, not all whitespace; the error is the
/// BadRequest message.
pub(crate) fn validate_group(group: &str) -> Result<(), String> {
    if group.trim().is_empty() {
        return Err("The group name must not be empty or only whitespace.".into());
    }
    if group.chars().count() > MAX_GROUP_NAME {
        return Err(format!(
            "The group name is longer than {MAX_GROUP_NAME} characters."
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names() {
        for ok in ["h", "Hub_1", "a`,.[]z", &"a".repeat(128)] {
            assert!(validate_hub(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "_a", "a-b", "a b", "hé", &"a".repeat(129)] {
            assert!(validate_hub(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_names() {
        for ok in ["g", " g ", &"é".repeat(1024)] {
            assert!(validate_group(ok).is_ok(), "{ok}");
        }
        for bad in ["", " ", "\t\n", &"g".repeat(1025)] {
            assert!(validate_group(bad).is_err(), "{bad:?}");
        }
    }
}
