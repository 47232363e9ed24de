//! Publishing to rooms: the [`Publish`] future, the encoding cache that
//! serializes a broadcast once per wire form, and the publish paths (plain,
//! positioned in a recoverable room, idempotent).

use super::*;

/// The future returned by [`Hub::publish`]: resolves when the backplane
/// accepted the message (local members were queued when it was created; in
/// a recoverable room, when the store appended it — at once with an
/// in-memory store, otherwise in a task spawned by `publish`, so dropping
/// this future loses nothing).
#[must_use = "delivery is under way; await this to learn whether it was stored and reached other nodes"]
pub struct Publish(PublishState);

pub(super) enum PublishState {
    Done(Option<Error>, Published),
    Backplane(futures::future::BoxFuture<'static, Result<()>>, Published),
    Task(futures::future::BoxFuture<'static, Result<Published>>),
}

/// What a completed [`Publish`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Published {
    /// In a recoverable room, the event's position in the room's stream
    /// (for a duplicate, the original's); `None` in other rooms.
    pub position: Option<StreamPosition>,
    /// `true` when the idempotency key was seen before: nothing was stored
    /// or delivered again.
    pub duplicate: bool,
}

/// As `{"offset": 7, "epoch": "…", "duplicate": false}` (`null` offset and
/// epoch outside recoverable rooms), so a handler can return it as its
/// reply — e.g. to confirm an optimistic update with its stream position.
impl Serialize for Published {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Published", 3)?;
        st.serialize_field("offset", &self.position.as_ref().map(|p| p.offset))?;
        st.serialize_field("epoch", &self.position.as_ref().map(|p| &*p.epoch))?;
        st.serialize_field("duplicate", &self.duplicate)?;
        st.end()
    }
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish").finish_non_exhaustive()
    }
}

impl Future for Publish {
    type Output = Result<Published>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<Published>> {
        use std::task::Poll;
        match &mut self.0 {
            PublishState::Done(e, p) => Poll::Ready(match e.take() {
                Some(e) => Err(e),
                None => Ok(std::mem::take(p)),
            }),
            PublishState::Backplane(f, p) => match f.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(std::mem::take(p))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            PublishState::Task(f) => f.as_mut().poll(cx),
        }
    }
}

/// Encodes one publish at most once per format, however many recipients.
pub(crate) struct Encoded<'a> {
    pub(crate) room: Option<&'a str>,
    pub(crate) event: &'a str,
    /// The event's offset in a recoverable room.
    pub(crate) offset: Option<u64>,
    pub(crate) payload: &'a mut dyn FnMut(Format) -> std::result::Result<Option<Payload>, ProtocolError>,
    /// By [`Wire::index`].
    pub(crate) frames: [Option<Bytes>; Wire::COUNT],
}

/// The payload source of an [`Encoded`] for an event whose payload is
/// already encoded (from the backplane, the store): each format gets the
/// payload transcoded (or as it is, in its own format).
pub(crate) fn transcoding(
    source: Option<&Payload>,
) -> impl FnMut(Format) -> std::result::Result<Option<Payload>, ProtocolError> + '_ {
    move |format| source.map(|p| p.to_format(format)).transpose()
}

impl Encoded<'_> {
    /// The event in `wire`'s form: encoded once per format, framed once
    /// per framed form.
    pub(crate) fn get(&mut self, wire: Wire) -> std::result::Result<Bytes, ProtocolError> {
        if let Some(b) = &self.frames[wire.index()] {
            return Ok(b.clone());
        }
        let plain = wire.plain();
        let envelope = match &self.frames[plain.index()] {
            Some(b) => b.clone(),
            None => {
                let payload = (self.payload)(wire.format)?;
                let parts = Parts {
                    room: self.room,
                    event: Some(self.event),
                    data: payload.as_ref().map(|p| p.bytes().as_ref()),
                    offset: self.offset,
                    ..Parts::new(Kind::Event)
                };
                let bytes = parts.encode_as(wire.format, wire.version);
                self.frames[plain.index()] = Some(bytes.clone());
                bytes
            }
        };
        let bytes = match wire.compressed(&envelope) {
            Some(frame) => frame,
            // Not compressed for this form: the framed one, shared.
            None => match wire.uncompressed() {
                Some(framed) => self.get(framed)?,
                None => wire.prepare(Kind::Event, Some(self.event), envelope),
            },
        };
        self.frames[wire.index()] = Some(bytes.clone());
        Ok(bytes)
    }
}

pub(crate) const MAX_EVENT_NAME_LEN: usize = 128;

pub(super) fn check_event(event: &str) -> Result<()> {
    if event.is_empty() || event.len() > MAX_EVENT_NAME_LEN {
        return Err(Error::msg(ErrorKind::Protocol, "event name must be 1 to 128 bytes"));
    }
    Ok(())
}

impl Hub {
    /// Publishes `event` with `data` to every member of `room`, on this node
    /// and (through the backplane) on every other. The data is serialized at
    /// most once per envelope format, whatever the number of members.
    ///
    /// Local members are queued *when this is called*; the returned future
    /// resolves once the backplane accepted the message (at once without a
    /// backplane). It errors when the room or event name is invalid, the data
    /// does not serialize (nothing is delivered then), the hub is shutting
    /// down ([`Error::is_shutting_down`]: once [`Hub::shutdown`] has started
    /// nothing new is published), or the backplane fails (local members were
    /// served). The future is `'static` and `Send`, so
    /// it can be spawned.
    pub fn publish<T: Serialize + ?Sized>(&self, room: &str, event: &str, data: &T) -> Publish {
        Publish(self.publish_now(room, event, data, 0, None))
    }

    /// Like [`Hub::publish`], with an idempotency key: in a recoverable room,
    /// a retried publish with a key the room's retained history has seen is
    /// stored and delivered once (the retry resolves with the original's
    /// position and [`Published::duplicate`]). In other rooms the key is
    /// ignored.
    pub fn publish_idempotent<T: Serialize + ?Sized>(&self, room: &str, event: &str, data: &T, key: &str) -> Publish {
        Publish(self.publish_now(room, event, data, 0, Some(key)))
    }

    /// A page of `room`'s history, read from the store: the retained events
    /// after `since` (or the newest ones with `None`), at most `limit`, and
    /// the stream's top position. Errors with
    /// [`ErrorKind::Config`] when the room is not recoverable.
    pub fn history_page(
        &self,
        room: &str,
        since: Option<StreamPosition>,
        limit: usize,
    ) -> BoxFuture<'static, Result<HistoryRead>> {
        let Some(link) = self.history() else {
            return Box::pin(async { Err(Error::msg(ErrorKind::Config, "no history store")) });
        };
        if link.config.room(room).is_none() {
            return Box::pin(async { Err(Error::msg(ErrorKind::Config, "room is not recoverable")) });
        }
        link.store.read(room, since, limit)
    }

    /// The live position of a recoverable room on this node (the offset of
    /// the last event delivered to its members here), if it has local
    /// members.
    pub fn room_position(&self, room: &str) -> Option<StreamPosition> {
        self.inner.rooms.get(room)?.stream.as_ref()?.position()
    }

    /// Like [`Hub::publish`], skipping the connection `except` (typically the
    /// sender), here and on other nodes.
    pub fn publish_except<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
        except: ConnectionId,
    ) -> Publish {
        Publish(self.publish_now(room, event, data, except.0, None))
    }

    pub(super) fn publish_now<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
        exclude: u64,
        key: Option<&str>,
    ) -> PublishState {
        let done = |e: Error| PublishState::Done(Some(e), Published::default());
        if let Err(e) = self.taking_work() {
            return done(e);
        }
        if let Err(why) = validate_room_name(room) {
            return done(Error::msg(ErrorKind::InvalidRoom, why));
        }
        if let Err(e) = check_event(event) {
            return done(e);
        }
        if let Some(settings) = self.recoverable(room) {
            let payload = match Payload::encode(Format::Json, data).or_else(|_| Payload::encode(Format::MsgPack, data))
            {
                Ok(p) => p,
                Err(e) => return done(e.into()),
            };
            return self.publish_positioned(room, event, payload, exclude, key, settings.retention);
        }
        let mut payloads: [Option<Payload>; 2] = [None, None];
        let mut payload_fn = |format: Format| -> std::result::Result<Option<Payload>, ProtocolError> {
            if let Some(p) = &payloads[format.index()] {
                return Ok(Some(p.clone()));
            }
            let p = Payload::encode(format, data)?;
            payloads[format.index()] = Some(p.clone());
            Ok(Some(p))
        };
        let mut encoded =
            Encoded { room: Some(room), event, offset: None, payload: &mut payload_fn, frames: Default::default() };
        if let Err(e) = self.deliver_local(room, exclude, &mut encoded) {
            return done(e.into());
        }
        let Some(link) = &self.inner.backplane else { return PublishState::Done(None, Published::default()) };
        // Other nodes get whichever encoding exists already (JSON first), so
        // the value is serialized no more often than local delivery needed.
        let [json, msgpack] = payloads;
        let payload = match json.or(msgpack) {
            Some(p) => p,
            None => match Payload::encode(Format::Json, data).or_else(|_| Payload::encode(Format::MsgPack, data)) {
                Ok(p) => p,
                Err(e) => return done(e.into()),
            },
        };
        let msg = RoomMessage::encode(self.inner.node, exclude, event, Some(&payload), None);
        PublishState::Backplane(link.backplane.publish(room, msg), Published::default())
    }

    /// A publish to a recoverable room: append (the store assigns the
    /// offset), deliver locally in offset order, then tell other nodes. The
    /// work is polled once here, so with a store that answers at once local
    /// delivery has happened when `publish` returns; otherwise it goes on in
    /// a spawned task.
    pub(super) fn publish_positioned(
        &self,
        room: &str,
        event: &str,
        payload: Payload,
        exclude: u64,
        key: Option<&str>,
        retention: crate::history::Retention,
    ) -> PublishState {
        let Some(link) = self.history() else { unreachable!("recoverable rooms need a history store") };
        let append = crate::history::Append {
            event: event.to_owned(),
            data: Some(payload.clone()),
            idempotency_key: key.map(str::to_owned),
            retention,
        };
        let appending = link.store.append(room, append);
        let (hub, room, event) = (self.clone(), room.to_owned(), Arc::<str>::from(event));
        let work = async move {
            let appended = appending.await?;
            let position = appended.position;
            let published = Published { position: Some(position.clone()), duplicate: appended.duplicate };
            if appended.duplicate {
                return Ok(published);
            }
            let ev = stream::Positioned {
                offset: position.offset,
                epoch: position.epoch.clone(),
                event: event.clone(),
                payload: Some(payload.clone()),
                exclude,
            };
            hub.deliver_positioned(&room, ev);
            if let Some(link) = &hub.inner.backplane {
                let msg = RoomMessage::encode(hub.inner.node, exclude, &event, Some(&payload), Some(&position));
                link.backplane.publish(&room, msg).await?;
            }
            Ok(published)
        };
        let mut work: BoxFuture<'static, Result<Published>> = Box::pin(work);
        if let Some(result) = (&mut work).now_or_never() {
            return match result {
                Ok(p) => PublishState::Done(None, p),
                Err(e) => PublishState::Done(Some(e), Published::default()),
            };
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let task = rt.spawn(work);
                PublishState::Task(Box::pin(async move {
                    task.await.unwrap_or_else(|e| Err(Error::msg(ErrorKind::Backplane, format!("publish task: {e}"))))
                }))
            }
            Err(_) => PublishState::Task(work),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broadcast is encoded once per format and compressed once for every
    /// member that negotiated `permessage-deflate`: they all get the very
    /// same buffer. Below the threshold they share the framed one instead.
    #[test]
    fn compressed_once_per_broadcast_and_shared() {
        let text = "a chat line that repeats, a chat line that repeats, a chat line that repeats";
        let mut encodings = 0;
        let mut payload = |f: Format| {
            encodings += 1;
            Payload::encode(f, &text).map(Some)
        };
        let mut e =
            Encoded { room: Some("r"), event: "m", offset: None, payload: &mut payload, frames: Default::default() };
        let z = Wire::compressing(Format::Json, 64);
        let first = e.get(z).unwrap();
        let again = e.get(z).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "one compressed buffer for every member");
        assert_eq!(first[0], 0xC1, "final text frame with RSV1");
        let framed = e.get(z.uncompressed().unwrap()).unwrap();
        assert_eq!(framed[0], 0x81);
        assert!(first.len() < framed.len());
        drop(e);
        assert_eq!(encodings, 1);

        // Below the threshold: the framed buffer itself, RSV1 clear.
        let mut payload = |f: Format| Payload::encode(f, &"short").map(Some);
        let mut e =
            Encoded { room: Some("r"), event: "m", offset: None, payload: &mut payload, frames: Default::default() };
        let small = e.get(Wire::compressing(Format::Json, 1024)).unwrap();
        let framed = e.get(Wire::compressing(Format::Json, 1024).uncompressed().unwrap()).unwrap();
        assert_eq!(small.as_ptr(), framed.as_ptr());
        assert_eq!(small[0], 0x81);
    }
}
