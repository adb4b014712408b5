//! A two-client chat with the async Rust API.
//!
//! Usage: `cargo run --example chat -- ALICE_URL BOB_URL`, each a client access URL
//! (`ws(s)://host/client/hubs/HUB?access_token=...`) with the join and send roles.
//! `scripts/run-examples.sh` runs it against the local emulator.

use std::time::Duration;
use webpubsub_client::{Client, ClientOptions, Credential, DataType, Event, SendToGroupOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut urls = std::env::args().skip(1);
    let (Some(alice_url), Some(bob_url)) = (urls.next(), urls.next()) else {
        return Err("usage: chat ALICE_URL BOB_URL".into());
    };
    let (alice, _) = Client::with_channel(Credential::Url(alice_url), ClientOptions::default())?;
    let (bob, mut bob_events) =
        Client::with_channel(Credential::Url(bob_url), ClientOptions::default())?;
    alice.start().await?;
    bob.start().await?;
    bob.join_group("lobby").await?;

    let no_echo = SendToGroupOptions {
        no_echo: true,
        ..Default::default()
    };
    alice
        .send_to_group("lobby", DataType::Text, "hello bob".into(), no_echo)
        .await?;
    let json = r#"{"mood":"happy"}"#;
    let ack = alice
        .send_to_group("lobby", DataType::Json, json.into(), no_echo)
        .await?;
    println!("alice: second message acked with ackId {:?}", ack.ack_id);

    let mut received = 0;
    while received < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), bob_events.recv())
            .await?
            .ok_or("bob's event stream ended")?;
        if let Event::GroupMessage {
            group,
            from_user_id,
            data_type,
            data,
            ..
        } = event
        {
            let text = String::from_utf8_lossy(&data);
            println!("bob: {group} from {from_user_id:?}: {data_type:?} {text}");
            received += 1;
        }
    }
    alice.stop().await;
    bob.stop().await;
    println!("chat done");
    Ok(())
}
