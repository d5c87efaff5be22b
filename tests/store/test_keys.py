"""Key names are part of the storage contract: pin them byte for byte."""

from recsvc.store import keys


def test_user_keys_share_one_hash_tag() -> None:
    assert keys.user_keys("u42", ["e1", "e2"]) == [
        "{u:u42}:s",
        "{u:u42}:r",
        "{u:u42}:p",
        "{u:u42}:v",
        "{u:u42}:e:e1",
        "{u:u42}:e:e2",
    ]


def test_item_keys_share_one_hash_tag() -> None:
    assert keys.item_keys([("u1", "e9")]) == [
        "{items}:idx",
        "{items}:ids",
        "{items}:state",
        "{items}:catidx",
        "{items}:cats",
        "{items}:ver",
        "{items}:epoch",
        "{items}:dirty",
        "{items}:format",
        "{items}:e:u1/e9",
    ]


def test_read_keys_are_the_item_slot() -> None:
    assert keys.item_read_keys() == [
        "{items}:epoch",
        "{items}:ver",
        "{items}:ids",
        "{items}:cats",
        "{items}:state",
        "{items}:dirty",
        "{items}:format",
    ]
