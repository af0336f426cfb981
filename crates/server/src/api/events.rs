//! EventService: the activity log, listed and watched.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use boilerhouse_core::event::{Event, EventFilter};
use boilerhouse_proto::convert::{self, timestamp_from_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::event_service_server::EventService;

use super::AppState;
use crate::error::ApiError;
use crate::store::{EventQuery, Store, StoreError};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
const REPLAY_PAGE: u32 = 500;

/// EventService over the store.
pub struct Events(pub AppState);

fn parse_resume_token(token: &str) -> Result<Option<u64>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::invalid("resume_token", "is not a token this server issued"))
}

#[tonic::async_trait]
impl EventService for Events {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let req = request.into_inner();
        let filter = convert::event_filter_from_pb(req.filter.as_ref()).map_err(ApiError::from)?;
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            n if n > MAX_LIMIT => {
                return Err(
                    ApiError::invalid("limit", format!("must be at most {MAX_LIMIT}")).into(),
                );
            }
            n => n,
        };
        let query = EventQuery {
            filter,
            after_id: req.after_id,
            since: req.since.as_ref().map(timestamp_from_pb),
            limit,
            latest: req.latest,
        };
        let events = self
            .0
            .store
            .list_events(&query)
            .await
            .map_err(ApiError::from)?;
        let next_after_id = events.last().map_or(req.after_id, |e| e.id);
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(pb::Event::from).collect(),
            next_after_id,
        }))
    }

    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        let filter = convert::event_filter_from_pb(req.filter.as_ref()).map_err(ApiError::from)?;
        let resume = parse_resume_token(&req.resume_token)?;
        // Subscribe before reading the database: anything committed after
        // this point arrives on the feed, anything before it is in the
        // database, and ids tell the overlap apart.
        let feed = self.0.store.subscribe_events();
        let cursor = match resume {
            Some(id) => id,
            None => self.0.store.last_event_id().await.map_err(ApiError::from)?,
        };
        let (tx, rx) = mpsc::channel(256);
        let store = self.0.store.clone();
        let shutdown = self.0.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = pump(store, feed, filter, cursor, &tx, shutdown).await {
                let _ = tx.send(Err(Status::from(ApiError::from(e)))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Sink = mpsc::Sender<Result<pb::WatchEventsResponse, Status>>;

/// Sends one event; false when the client has gone.
async fn send(tx: &Sink, event: &Event) -> bool {
    let response = pb::WatchEventsResponse {
        event: Some(pb::Event::from(event)),
        resume_token: event.id.to_string(),
    };
    tx.send(Ok(response)).await.is_ok()
}

/// Replays matching events after `cursor` from the database, page by page.
/// Returns the new cursor, or None when the client has gone.
async fn replay(
    store: &Store,
    filter: &EventFilter,
    mut cursor: u64,
    tx: &Sink,
) -> Result<Option<u64>, StoreError> {
    loop {
        let page = store
            .list_events(&EventQuery {
                filter: filter.clone(),
                after_id: cursor,
                since: None,
                limit: REPLAY_PAGE,
                latest: false,
            })
            .await?;
        for event in &page {
            if !send(tx, event).await {
                return Ok(None);
            }
            cursor = event.id;
        }
        if page.len() < REPLAY_PAGE as usize {
            return Ok(Some(cursor));
        }
    }
}

async fn pump(
    store: Store,
    mut feed: broadcast::Receiver<Event>,
    filter: EventFilter,
    cursor: u64,
    tx: &Sink,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), StoreError> {
    let Some(mut cursor) = replay(&store, &filter, cursor, tx).await? else {
        return Ok(());
    };
    loop {
        tokio::select! {
            // Cancel-safe: observing the token loses nothing.
            () = shutdown.cancelled() => return Ok(()),
            // Cancel-safe: closed() only watches the receiver.
            () = tx.closed() => return Ok(()),
            // Cancel-safe: broadcast::Receiver::recv loses no message when
            // dropped before completion.
            received = feed.recv() => match received {
                Ok(event) => {
                    if event.id <= cursor {
                        continue;
                    }
                    if filter.matches(&event.event) && !send(tx, &event).await {
                        return Ok(());
                    }
                    cursor = event.id;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live feed: catch up from the database.
                    match replay(&store, &filter, cursor, tx).await? {
                        Some(c) => cursor = c,
                        None => return Ok(()),
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}
