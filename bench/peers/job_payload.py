"""The benchmark's job payload, identical to Warren's (bench/src/main.rs): ~150 bytes of JSON.

Its own module, free of dependencies, so that bench/callgrind can use it outside the
benchmark's virtualenv."""


def payload(i: int) -> dict:
    return {
        "user_id": i,
        "action": "send-welcome-email",
        "email": "someone@example.com",
        "template": "welcome-v2",
        "locale": "en-GB",
        "attempt_hint": 0,
        "pad": "xxxxxxxxxxxxxxxx",
    }
