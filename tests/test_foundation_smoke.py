from utils.tokens import open_tokens, read_meta


def test_processed_fixture_round_trips(processed_dir, tokenizer):
    meta = read_meta(processed_dir)
    train = open_tokens(processed_dir, "train")
    assert len(train) == meta["train_tokens"] > 1000
    assert int(train.max()) < meta["vocab_size"]
    first_doc_end = list(train).index(tokenizer.eos_token_id)
    assert tokenizer.decode(train[:first_doc_end]).strip()
