//! one WebSocket, many streams: flow control, keepalive, sync and close.
