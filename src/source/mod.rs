//! Broker adapters. RabbitMQ today; Azure Event Hubs (AMQP 1.0) is to come behind the same shape:
//! a delivery's body and properties in, the evaluation envelope out, ack or dead-letter back.

pub mod rabbitmq;
