// WARREN PATCH (see patches/PATCHED.md in Warren): each pending confirm remembers which
// publish it confirms ([`PublishIdentity`]) and takes that publish's returned message, not the
// first waiting one; the confirms of a multiple ack complete in tag order.

use crate::{
    Error, Promise, PromiseResolver,
    id_sequence::IdSequence,
    protocol::{AMQPError, AMQPSoftError},
    publisher_confirm::{Confirmation, PublisherConfirm},
    returned_messages::{PublishIdentity, ReturnedMessages},
    shared::SharedMutex,
    types::DeliveryTag,
};
use std::{collections::HashMap, fmt, sync::MutexGuard};
use tracing::trace;

#[derive(Clone)]
pub(crate) struct Acknowledgements(SharedMutex<Inner>);

type AMQPResult = Result<(), AMQPError>;

impl Acknowledgements {
    pub(crate) fn new(channel_id: u16, returned_messages: ReturnedMessages) -> Self {
        Self(SharedMutex::new(Inner::new(channel_id, returned_messages)))
    }

    pub(crate) fn register_pending(&self, publish: PublishIdentity) -> PublisherConfirm {
        self.lock_inner().register_pending(publish)
    }

    pub(crate) fn get_last_pending(&self) -> Option<Promise<()>> {
        self.lock_inner().last.take()
    }

    pub(crate) fn ack(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner().drop_pending(delivery_tag, true)
    }

    pub(crate) fn nack(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner().drop_pending(delivery_tag, false)
    }

    pub(crate) fn ack_all_pending(&self) {
        self.lock_inner().drop_all(true);
    }

    pub(crate) fn nack_all_pending(&self) {
        self.lock_inner().drop_all(false);
    }

    pub(crate) fn ack_all_before(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner()
            .complete_pending_before(delivery_tag, true)
    }

    pub(crate) fn nack_all_before(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner()
            .complete_pending_before(delivery_tag, false)
    }

    pub(crate) fn on_channel_error(&self, error: Error) {
        self.lock_inner().on_channel_error(error);
    }

    pub(crate) fn reset(&self, error: Error) {
        self.lock_inner().reset(error);
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock()
    }
}

impl fmt::Debug for Acknowledgements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Acknowledgements");
        if let Some(inner) = self.0.try_lock() {
            debug
                .field("delivery_tag", &inner.delivery_tag)
                .field("returned_messages", &inner.returned_messages)
                .field("pending", &inner.pending.keys());
        }
        debug.finish()
    }
}

struct Inner {
    channel_id: u16,
    delivery_tag: IdSequence<DeliveryTag>,
    last: Option<Promise<()>>,
    pending: HashMap<DeliveryTag, Pending>,
    returned_messages: ReturnedMessages,
}

/// A publish waiting for its confirm.
struct Pending {
    /// Resolves the publish's [`PublisherConfirm`].
    confirm: PromiseResolver<Confirmation>,
    /// Resolves [`Acknowledgements::get_last_pending`] if this is the last publish.
    last: PromiseResolver<()>,
    /// WARREN PATCH: which publish this is, to find its returned message.
    publish: PublishIdentity,
}

impl Inner {
    fn new(channel_id: u16, returned_messages: ReturnedMessages) -> Self {
        Self {
            channel_id,
            delivery_tag: IdSequence::new(false),
            last: None,
            pending: HashMap::default(),
            returned_messages,
        }
    }

    fn register_pending(&mut self, publish: PublishIdentity) -> PublisherConfirm {
        let delivery_tag = self.delivery_tag.next();
        trace!("Publishing with delivery_tag {}", delivery_tag);
        let (promise, resolver) = Promise::new("acknowledgement");
        let (err_promise, err_resolver) = Promise::new("acknowledgement-error");
        let promise = PublisherConfirm::new(promise, self.returned_messages.clone());
        self.last = Some(err_promise);
        self.pending.insert(
            delivery_tag,
            Pending {
                confirm: resolver,
                last: err_resolver,
                publish,
            },
        );
        promise
    }

    fn complete_pending(&mut self, success: bool, delivery_tag: DeliveryTag, pending: Pending) {
        // WARREN PATCH: the return of this publish (it arrived before this confirm), if any.
        let returned_message = self.returned_messages.take_waiting_message(&pending.publish);
        pending.confirm.resolve(if success {
            Confirmation::Ack(returned_message)
        } else {
            Confirmation::Nack(returned_message)
        });
        if Some(delivery_tag) == self.delivery_tag.current() {
            pending.last.resolve(());
        }
    }

    /// WARREN PATCH: once no confirm is pending, a waiting return belongs to none of them
    /// (a return arrives before its publish's confirm, and after the publish was registered):
    /// hand it to `wait_for_confirms` instead of a later publish with the same identity.
    fn release_unclaimed_returns(&self) {
        if self.pending.is_empty() {
            self.returned_messages.release_waiting_messages();
        }
    }

    fn drop_all(&mut self, success: bool) {
        // WARREN PATCH: in tag (publish) order, as returns are, not in hash order.
        let mut pending = std::mem::take(&mut self.pending)
            .into_iter()
            .collect::<Vec<_>>();
        pending.sort_unstable_by_key(|(delivery_tag, _)| *delivery_tag);
        for (delivery_tag, pending) in pending {
            self.complete_pending(success, delivery_tag, pending);
        }
        self.release_unclaimed_returns();
    }

    fn drop_pending(&mut self, delivery_tag: DeliveryTag, success: bool) -> AMQPResult {
        if let Some(pending) = self.pending.remove(&delivery_tag) {
            self.complete_pending(success, delivery_tag, pending);
            self.release_unclaimed_returns();
            Ok(())
        } else {
            Err(AMQPError::new(
                AMQPSoftError::PRECONDITIONFAILED.into(),
                format!(
                    "invalid {} received for inexistant delivery_tag {} on channel {}, current is {:?}, was expecting one of {:?}",
                    if success { "ack" } else { "nack" },
                    delivery_tag,
                    self.channel_id,
                    self.delivery_tag.current(),
                    self.pending.keys()
                )
                .into(),
            ))
        }
    }

    fn complete_pending_before(&mut self, delivery_tag: DeliveryTag, success: bool) -> AMQPResult {
        // Tags are collected from self.pending, so drop_pending should never fail here.
        // Multiple errors are unlikely, and if they occur they are likely identical; callers
        // also handle the underlying acknowledgement state independently, so returning the
        // last error is sufficient.
        let mut res = Ok(());
        let mut tags = self
            .pending
            .keys()
            .filter(|tag| **tag <= delivery_tag)
            .cloned()
            .collect::<Vec<DeliveryTag>>();
        // WARREN PATCH: in tag (publish) order, as returns are, not in hash order.
        tags.sort_unstable();
        for tag in tags {
            if let Err(err) = self.drop_pending(tag, success) {
                res = Err(err);
            }
        }
        res
    }

    fn on_channel_error(&mut self, error: Error) {
        for (delivery_tag, pending) in self.pending.drain() {
            pending.confirm.reject(error.clone());
            if Some(delivery_tag) == self.delivery_tag.current() {
                pending.last.reject(error.clone());
            }
        }
        self.returned_messages.clear_dropped_confirms();
        // WARREN PATCH: returns whose confirm was just failed must not be paired with a
        // publish made after recovery; wait_for_confirms reports them.
        self.returned_messages.release_waiting_messages();
    }

    fn reset(&mut self, error: Error) {
        self.delivery_tag = IdSequence::new(false);
        self.on_channel_error(error);
    }
}

// WARREN PATCH: pairing of returned messages with their confirms.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BasicProperties, ErrorKind, error_holder::ErrorHolder, message::BasicReturnMessage,
        types::ShortString,
    };
    use futures_lite::future::block_on;

    const CHANNEL: u16 = 1;

    fn properties(message_id: Option<&str>) -> BasicProperties {
        match message_id {
            Some(id) => BasicProperties::default().with_message_id(id.into()),
            None => BasicProperties::default(),
        }
    }

    /// Registers a publish to `routing_key` with `message_id`, as `basic_publish` does.
    fn publish(
        acks: &Acknowledgements,
        routing_key: &str,
        message_id: Option<&str>,
    ) -> PublisherConfirm {
        acks.register_pending(PublishIdentity::new(
            &ShortString::from(""),
            &routing_key.into(),
            &properties(message_id),
        ))
    }

    /// The broker returning a publish: `basic.return`, then a content header (no body).
    fn broker_returns(returned: &ReturnedMessages, routing_key: &str, message_id: Option<&str>) {
        returned.start_new_delivery(BasicReturnMessage::new(
            "".into(),
            routing_key.into(),
            312,
            "NO_ROUTE".into(),
            ErrorHolder::default(),
        ));
        returned.handle_content_header_frame(0, properties(message_id), true);
    }

    /// The message id and routing key of the returned message a confirm carries, if any.
    fn carried(confirm: PublisherConfirm) -> Option<(Option<String>, String)> {
        match block_on(confirm).expect("a confirmation") {
            Confirmation::Ack(message) | Confirmation::Nack(message) => message.map(|message| {
                (
                    message.properties.message_id().as_ref().map(|id| id.to_string()),
                    message.routing_key.to_string(),
                )
            }),
            Confirmation::NotRequested => panic!("confirms were requested"),
        }
    }

    fn returned_as(id: Option<&str>, routing_key: &str) -> Option<(Option<String>, String)> {
        Some((id.map(str::to_owned), routing_key.to_owned()))
    }

    /// Publishes 1..=6, of which 2, 4 and 5 (5 without a message id) are returned; the broker
    /// confirms 6 alone, then 1-4 with one multiple ack, then 5. Each confirm carries its own
    /// publish's return: upstream handed 6 the return of 2, and so on down the queue.
    #[test]
    fn confirms_completed_out_of_order_carry_their_own_returns() {
        let returned = ReturnedMessages::default();
        let acks = Acknowledgements::new(CHANNEL, returned.clone());
        let c1 = publish(&acks, "queue", Some("m1"));
        let c2 = publish(&acks, "nowhere", Some("m2"));
        let c3 = publish(&acks, "queue", Some("m3"));
        let c4 = publish(&acks, "nowhere", Some("m4"));
        let c5 = publish(&acks, "nowhere", None);
        let c6 = publish(&acks, "queue", Some("m6"));
        broker_returns(&returned, "nowhere", Some("m2"));
        broker_returns(&returned, "nowhere", Some("m4"));
        broker_returns(&returned, "nowhere", None);

        acks.ack(6).expect("ack 6");
        acks.ack_all_before(4).expect("ack 1-4");
        acks.ack(5).expect("ack 5");

        assert_eq!(carried(c1), None);
        assert_eq!(carried(c2), returned_as(Some("m2"), "nowhere"));
        assert_eq!(carried(c3), None);
        assert_eq!(carried(c4), returned_as(Some("m4"), "nowhere"));
        assert_eq!(carried(c5), returned_as(None, "nowhere"));
        assert_eq!(carried(c6), None);
        assert!(returned.drain().is_empty(), "every return was claimed");
    }

    /// A nack carries its publish's return too, and a multiple nack completes in tag order:
    /// of two publishes with the same identity, the earlier gets the (one) return.
    #[test]
    fn a_multiple_nack_hands_returns_out_in_publish_order() {
        let returned = ReturnedMessages::default();
        let acks = Acknowledgements::new(CHANNEL, returned.clone());
        let confirms = (0..64)
            .map(|_| publish(&acks, "nowhere", Some("same")))
            .collect::<Vec<_>>();
        broker_returns(&returned, "nowhere", Some("same"));

        acks.nack_all_before(64).expect("nack 1-64");

        let mut confirms = confirms.into_iter();
        let first = confirms.next().expect("a confirm");
        assert_eq!(carried(first), returned_as(Some("same"), "nowhere"));
        for confirm in confirms {
            assert_eq!(carried(confirm), None);
        }
    }

    /// A return no pending publish claims is kept for the confirm it belongs to while others
    /// complete, and once nothing is pending it goes to `wait_for_confirms` (drain).
    #[test]
    fn an_unclaimed_return_waits_then_goes_to_wait_for_confirms() {
        let returned = ReturnedMessages::default();
        let acks = Acknowledgements::new(CHANNEL, returned.clone());
        let c1 = publish(&acks, "queue", Some("m1"));
        let c2 = publish(&acks, "nowhere", Some("m2"));
        broker_returns(&returned, "nowhere", Some("m2"));
        broker_returns(&returned, "elsewhere", Some("stray"));

        acks.ack(1).expect("ack 1");
        assert_eq!(carried(c1), None);
        assert!(returned.drain().is_empty(), "2 is still pending");
        acks.ack(2).expect("ack 2");
        assert_eq!(carried(c2), returned_as(Some("m2"), "nowhere"));
        let drained = returned.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].routing_key.as_str(), "elsewhere");
    }

    /// After a channel error failed the pending confirms, their returns are not paired with
    /// a publish made after recovery that has the same identity.
    #[test]
    fn returns_do_not_outlive_a_channel_reset() {
        let returned = ReturnedMessages::default();
        let acks = Acknowledgements::new(CHANNEL, returned.clone());
        let before = publish(&acks, "nowhere", Some("m1"));
        broker_returns(&returned, "nowhere", Some("m1"));

        acks.reset(ErrorKind::InvalidChannelState(crate::ChannelState::Error, "test").into());
        assert!(block_on(before).is_err(), "the confirm failed with the channel");

        let after = publish(&acks, "nowhere", Some("m1"));
        acks.ack(1).expect("ack 1 after reset");
        assert_eq!(carried(after), None);
        assert_eq!(returned.drain().len(), 1, "the old return is reported, not reused");
    }
}
