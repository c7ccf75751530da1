//! A WebSocket client for the tests that bridge an upgrade through the broker.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The opening handshake for `wss://api.openai.com<path>` over `io` (already TLS to the
/// broker), with `Authorization: Bearer <bearer>`; fails the test unless the answer is 101.
pub async fn open<S>(io: S, path: &str, bearer: &str) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = http::Request::builder()
        .uri(format!("wss://api.openai.com{path}"))
        .header("host", "api.openai.com")
        .header("authorization", format!("Bearer {bearer}"))
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("sec-websocket-version", "13")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(())
        .expect("request");
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, io),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// Send `text` and return the next text message.
pub async fn round_trip<S>(ws: &mut WebSocketStream<S>, text: &str) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.expect("send");
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer in time")
        .expect("a message")
        .expect("ok")
        .into_text()
        .expect("text")
        .to_string()
}
