"""What the tests expect of every Responses stream."""

TERMINAL_EVENTS = {"response.completed", "response.failed", "response.incomplete", "error"}

# The events of a response that writes one message of three words, in their canonical order.
MESSAGE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
