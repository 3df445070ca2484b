import math

import numpy as np
import pytest

from coop_perception.data.channel import (BandwidthLatency, BernoulliFramesLatency, Channel, Delivery,
                                          channel_for_mean_latency, make_channel)

N = 4000


def draws(channel: Channel, link=1, n=N, nbytes=0):
    return [channel.send(link, nbytes) for _ in range(n)]


def latencies(channel: Channel, link=1, n=N, nbytes=0) -> np.ndarray:
    return np.array([d.latency_s for d in draws(channel, link, n, nbytes)])


def test_deterministic_from_seed_and_independent_per_link():
    spec = {'model': 'uniform', 'low_ms': 100, 'high_ms': 300, 'loss': 0.1, 'seed': 3}
    a, b = make_channel(spec), make_channel(spec)
    assert draws(a, n=200) == draws(b, n=200)
    assert draws(make_channel({**spec, 'seed': 4}), n=200) != draws(make_channel(spec), n=200)
    # Interleaving another link does not change this link's sequence.
    alone = make_channel(spec)
    mixed = make_channel(spec)
    seq_alone = [alone.send('agent2') for _ in range(50)]
    seq_mixed = []
    for _ in range(50):
        mixed.send('agent1')
        seq_mixed.append(mixed.send('agent2'))
    assert seq_alone == seq_mixed
    assert draws(make_channel(spec), link=1, n=50) != draws(make_channel(spec), link=2, n=50)


@pytest.mark.parametrize('model,params', [
    ('fixed', {}),
    ('uniform', {}),
    ('bernoulli_frames', {}),
    ('bandwidth', {'bandwidth_mbps': 20, 'jitter_ms': 10, 'nbytes': 20_000}),
])
@pytest.mark.parametrize('mean_ms', [0, 100, 200, 300, 500])
def test_mean_latency_helper(model, params, mean_ms):
    if model == 'bandwidth' and mean_ms < 20:
        with pytest.raises(ValueError, match='below the transmission time'):
            channel_for_mean_latency(mean_ms, model, **params)
        return
    ch = channel_for_mean_latency(mean_ms, model, seed=11, **params)
    nbytes = params.get('nbytes', 0)
    assert ch.mean_latency_s(nbytes) == pytest.approx(mean_ms / 1000)
    lat = latencies(ch, nbytes=nbytes)
    assert lat.min() >= 0
    assert lat.mean() == pytest.approx(mean_ms / 1000, abs=0.005 + 0.03 * mean_ms / 1000)
    assert ch.spec['model'] == model


def test_loss_rate_and_lost_messages():
    ch = make_channel({'model': 'fixed', 'latency_ms': 50, 'loss': 0.2, 'seed': 1})
    out = draws(ch, n=20_000)
    delivered = np.array([d.delivered for d in out])
    assert (~delivered).mean() == pytest.approx(0.2, abs=0.01)
    lost = out[int(np.argmin(delivered))]
    assert not lost.delivered and math.isinf(lost.latency_s) and lost.arrival_ns(123) is None
    assert all(d.latency_s == pytest.approx(0.05) for d in out if d.delivered)


def test_same_messages_lost_across_delay_sweep():
    fates = [[d.delivered for d in draws(channel_for_mean_latency(m, loss=0.3, seed=5), n=300)]
             for m in (0, 100, 500)]
    assert fates[0] == fates[1] == fates[2]


def test_bandwidth_latency_grows_with_size():
    spec = {'model': 'bandwidth', 'base_ms': 10, 'bandwidth_mbps': 8, 'jitter_ms': 5, 'seed': 2}
    sizes = [0, 1_000, 20_000, 1_000_000]
    per_size = np.stack([latencies(make_channel(spec), nbytes=s, n=500) for s in sizes])
    assert np.all(np.diff(per_size, axis=0) > 0)  # same draws, only the size differs
    # 1 MB at 8 Mbit/s is exactly one second more than an empty message.
    assert np.allclose(per_size[3] - per_size[0], 1.0)
    assert BandwidthLatency(10, 8, 5).mean_s(20_000) == pytest.approx(0.010 + 0.005 + 0.020)


def test_bernoulli_frames_are_whole_frame_periods():
    model = BernoulliFramesLatency(p=0.3, frame_ms=100, trials=10)
    lat = latencies(Channel(model, seed=9))
    frames = lat / 0.1
    assert np.allclose(frames, np.round(frames)) and frames.min() >= 0 and frames.max() <= 10
    assert lat.mean() == pytest.approx(0.3, abs=0.01)
    on_time = (frames == 0).mean()
    assert on_time == pytest.approx(0.7 ** 10, abs=0.01)
    ch = make_channel({'model': 'bernoulli_frames', 'p': 0.5, 'frame_ms': 50, 'trials': 4})
    assert set(np.round(latencies(ch, n=500) / 0.05).astype(int)) <= set(range(5))


def test_clock_offset_per_link():
    ch = make_channel({'model': 'fixed', 'latency_ms': 0, 'clock_offset_ms': 5,
                       'clock_offset_std_ms': 20, 'seed': 0})
    offsets = [ch.clock_offset_s(k) for k in range(200)]
    assert len(set(offsets)) == 200
    assert np.mean(offsets) == pytest.approx(0.005, abs=0.004)
    assert np.std(offsets) == pytest.approx(0.020, rel=0.15)
    assert {d.clock_offset_s for d in draws(ch, link=7, n=20)} == {ch.clock_offset_s(7)}
    again = make_channel(ch.spec)
    assert again.clock_offset_s(7) == ch.clock_offset_s(7)
    assert make_channel({'model': 'fixed', 'latency_ms': 0}).clock_offset_s(1) == 0.0


def test_delivery_stamps_in_nanoseconds():
    d = Delivery(True, 0.25, -0.002)
    assert d.arrival_ns(1_000_000_000) == 1_250_000_000
    assert d.stamp_ns(1_000_000_000) == 998_000_000


@pytest.mark.parametrize('spec,match', [
    ({'model': 'gaussian'}, 'must be one of'),
    ({'model': 'uniform', 'low_ms': 1, 'high_ms': 2, 'hgih_ms': 3}, 'unknown key'),
    ({'model': 'uniform', 'low_ms': 1}, 'high_ms'),
    ({'model': 'uniform', 'low_ms': 3, 'high_ms': 2}, 'low_ms <= high_ms'),
    ({'model': 'fixed', 'latency_ms': 10, 'loss': 1.0}, 'loss'),
    ({'model': 'bernoulli_frames', 'p': 1.5}, 'p must be'),
    ({'model': 'bandwidth', 'base_ms': 1, 'bandwidth_mbps': 0}, 'bandwidth_mbps'),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        make_channel(spec)


def test_bernoulli_mean_beyond_maximum_rejected():
    with pytest.raises(ValueError, match='exceeds the maximum'):
        channel_for_mean_latency(1500, 'bernoulli_frames')
    ch = channel_for_mean_latency(500, 'bernoulli_frames', frame_ms=50, trials=20)
    assert ch.latency.p == pytest.approx(0.5)
