// WARREN PATCH (see patches/PATCHED.md in Warren): a returned message waits for the confirm
// of its own publish ([`PublishIdentity`], [`ReturnedMessages::take_waiting_message`]) instead
// of going to whichever confirm completes next, and a return is logged without its body.

use crate::{
    BasicProperties, Promise,
    message::BasicReturnMessage,
    publisher_confirm::Confirmation,
    types::{PayloadSize, ShortString},
};
use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};
use tracing::{debug, trace};

#[derive(Clone, Default)]
pub(crate) struct ReturnedMessages(Arc<Mutex<Inner>>);

/// WARREN PATCH: what a `basic.return` says about the publish it returns (the exchange and
/// routing key of the `basic.publish`, and the original properties' `message_id`), so that a
/// returned message is paired with the confirm of that publish.
///
/// RabbitMQ sends the return of publish N before the confirm of N, and returns in publish
/// order, so the first waiting return with the identity of a confirmed publish is that
/// publish's. Publishes with the same identity cannot be told apart: a return goes to the
/// earliest of them still pending (confirms of a multiple ack complete in tag order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PublishIdentity {
    exchange: ShortString,
    routing_key: ShortString,
    message_id: Option<ShortString>,
}

impl PublishIdentity {
    pub(crate) fn new(
        exchange: &ShortString,
        routing_key: &ShortString,
        properties: &BasicProperties,
    ) -> Self {
        Self {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            message_id: properties.message_id().clone(),
        }
    }

    fn matches(&self, message: &BasicReturnMessage) -> bool {
        self.exchange == message.delivery.exchange
            && self.routing_key == message.delivery.routing_key
            && self.message_id == *message.delivery.properties.message_id()
    }
}

impl ReturnedMessages {
    pub(crate) fn start_new_delivery(&self, message: BasicReturnMessage) {
        self.lock_inner().current_message = Some(message);
    }

    pub(crate) fn handle_content_header_frame(
        &self,
        size: PayloadSize,
        properties: BasicProperties,
        confirm_mode: bool,
    ) {
        self.lock_inner()
            .handle_content_header_frame(size, properties, confirm_mode);
    }

    pub(crate) fn handle_body_frame(
        &self,
        remaining_size: PayloadSize,
        payload: Vec<u8>,
        confirm_mode: bool,
    ) {
        self.lock_inner()
            .handle_body_frame(remaining_size, payload, confirm_mode);
    }

    pub(crate) fn drain(&self) -> Vec<BasicReturnMessage> {
        self.lock_inner().drain()
    }

    pub(crate) fn register_dropped_confirm(&self, promise: Promise<Confirmation>) {
        self.lock_inner().register_dropped_confirm(promise);
    }

    /// WARREN PATCH: the first waiting returned message of the publish `publish`, if any
    /// (not simply the first waiting one). Returns of other publishes stay queued.
    pub(crate) fn take_waiting_message(
        &self,
        publish: &PublishIdentity,
    ) -> Option<BasicReturnMessage> {
        let mut inner = self.lock_inner();
        let position = inner
            .waiting_messages
            .iter()
            .position(|message| publish.matches(message))?;
        inner.waiting_messages.remove(position)
    }

    /// WARREN PATCH: hands every waiting returned message to [`Self::drain`]
    /// (`wait_for_confirms`): called when no confirm is pending any more (a waiting return
    /// then belongs to none) and when pending confirms are failed by a channel error, so that
    /// an old return is never paired with a later publish of the same identity.
    pub(crate) fn release_waiting_messages(&self) {
        let mut inner = self.lock_inner();
        if !inner.waiting_messages.is_empty() {
            trace!(
                count = inner.waiting_messages.len(),
                "Returned messages without a pending confirm, keeping them for wait_for_confirms"
            );
            let waiting = std::mem::take(&mut inner.waiting_messages);
            inner.messages.extend(waiting);
        }
    }

    pub(crate) fn clear_dropped_confirms(&self) {
        self.lock_inner().dropped_confirms.clear();
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for ReturnedMessages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ReturnedMessages");
        if let Ok(inner) = self.0.try_lock() {
            debug
                .field("waiting_messages", &inner.waiting_messages)
                .field("messages", &inner.messages)
                .field("non_confirm_messages", &inner.non_confirm_messages);
        }
        debug.finish()
    }
}

#[derive(Default)]
struct Inner {
    current_message: Option<BasicReturnMessage>,
    non_confirm_messages: Vec<BasicReturnMessage>,
    waiting_messages: VecDeque<BasicReturnMessage>,
    messages: Vec<BasicReturnMessage>,
    dropped_confirms: Vec<Promise<Confirmation>>,
}

impl Inner {
    fn handle_content_header_frame(
        &mut self,
        size: PayloadSize,
        properties: BasicProperties,
        confirm_mode: bool,
    ) {
        if let Some(message) = self.current_message.as_mut() {
            message.properties = properties;
        }
        if size == 0 {
            self.new_delivery_complete(confirm_mode);
        }
    }

    fn handle_body_frame(
        &mut self,
        remaining_size: PayloadSize,
        payload: Vec<u8>,
        confirm_mode: bool,
    ) {
        if let Some(message) = self.current_message.as_mut() {
            message.receive_content(payload);
        }
        if remaining_size == 0 {
            self.new_delivery_complete(confirm_mode);
        }
    }

    fn new_delivery_complete(&mut self, confirm_mode: bool) {
        if let Some(message) = self.current_message.take() {
            // WARREN PATCH: the returned message comes from the network (its body and headers
            // are whatever the publisher sent); log where it went and why, not its contents.
            debug!(
                exchange = %message.delivery.exchange,
                routing_key = %message.delivery.routing_key,
                reply_code = message.reply_code,
                "Server returned us a message"
            );
            if confirm_mode {
                self.waiting_messages.push_back(message);
            } else {
                self.non_confirm_messages.push(message);
            }
        }
    }

    fn process_dropped_confirm(
        &mut self,
        promise: Promise<Confirmation>,
        messages: Option<&mut Vec<BasicReturnMessage>>,
    ) {
        let messages = messages.unwrap_or(&mut self.messages);

        if let Some(confirmation) = promise.try_wait() {
            if let Ok(Confirmation::Nack(Some(message))) | Ok(Confirmation::Ack(Some(message))) =
                confirmation
            {
                trace!("PublisherConfirm was carrying a message, storing it");
                messages.push(message);
            } else {
                trace!("PublisherConfirm was ready but didn't carry a message, discarding");
            }
        } else {
            trace!("PublisherConfirm wasn't ready yet, storing it for further use");
            self.dropped_confirms.push(promise);
        }
    }

    fn register_dropped_confirm(&mut self, promise: Promise<Confirmation>) {
        trace!("Registering new dropped PublisherConfirm");
        self.process_dropped_confirm(promise, None)
    }

    fn drain(&mut self) -> Vec<BasicReturnMessage> {
        let mut messages = std::mem::take(&mut self.messages);
        if !self.non_confirm_messages.is_empty() {
            let mut non_confirm_messages = std::mem::take(&mut self.non_confirm_messages);
            non_confirm_messages.append(&mut messages);
            messages = non_confirm_messages;
        }
        let before = self.dropped_confirms.len();
        if before != 0 {
            for promise in std::mem::take(&mut self.dropped_confirms) {
                self.process_dropped_confirm(promise, Some(&mut messages))
            }
            trace!(
                %before,
                after=%self.dropped_confirms.len(),
                "PublisherConfirms processed"
            );
        }
        messages
    }
}
