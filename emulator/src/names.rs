//! Hub and group names the service accepts. The rules are the REST API's path patterns
//! (specification `webpubsub/data-plane`, 2024-12-01); that the client endpoint and
//! the client protocol apply the same ones is the emulator's assumption.

/// Longest group name accepted, in UTF-16 code units.
pub(crate) const MAX_GROUP_NAME: usize = 1024;
/// Longest hub name accepted.
pub(crate) const MAX_HUB_NAME: usize = 128;

/// Checks a hub name against ``^[A-Za-z][A-Za-z0-9_`,.[\]]{0,127}$``; the error is
/// the BadRequest message.
pub fn validate_hub(hub: &str) -> Result<(), String> {
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

/// Checks a group name against the API's `minLength` 1, `maxLength` 1024 and pattern
/// `^(?!\s+$).+$` as the service (.NET) evaluates them: the length counts UTF-16 code
/// units; `\s` is `[\f\n\r\t\v\x85\p{Z}]`, the same set as [`char::is_whitespace`], so
/// a name of whitespace only is refused; `.` matches anything but `\n`, and `$` also
/// matches before a final `\n`, so a `\n` may only end the name. The error is the
/// BadRequest message.
pub fn validate_group(group: &str) -> Result<(), String> {
    if group.trim().is_empty() {
        return Err("The group name must not be empty or only whitespace.".into());
    }
    if group.encode_utf16().count() > MAX_GROUP_NAME {
        return Err(format!(
            "The group name is longer than {MAX_GROUP_NAME} characters (UTF-16 code units)."
        ));
    }
    if group.strip_suffix('\n').unwrap_or(group).contains('\n') {
        return Err(
            "The group name must not contain a line feed but as its last character.".into(),
        );
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
        let astral = "\u{1F600}";
        for ok in [
            "g",
            " g ",
            "g\n",
            "g\r",
            " g\r\n",
            "\u{200B}",
            &"é".repeat(1024),
            &astral.repeat(512),
            &format!("{}\n", "g".repeat(1023)),
        ] {
            assert!(validate_group(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            " ",
            "\t\n",
            "\n",
            " \n",
            "\u{85}\u{A0}\u{1680}\u{2000}\u{2028}\u{2029}\u{202F}\u{205F}\u{3000}\u{B}\u{C}",
            "a\nb",
            "\ng",
            "g\n\n",
            &"g".repeat(1025),
            &astral.repeat(513),
            &format!("{}\u{1F600}", "g".repeat(1023)),
            &format!("{}\n", "g".repeat(1024)),
        ] {
            assert!(validate_group(bad).is_err(), "{bad:?}");
        }
    }
}
