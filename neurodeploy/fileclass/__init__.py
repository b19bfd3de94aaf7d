"""File classification with spiking networks (Stanojević, Cherubini, Moraitis, Sebastian,
"File classification based on spiking neural networks", ISCAS 2020): key-value metadata
of files, a correlative temporal encoding, an STDP-trained LIF layer and a supervised
spike-pattern readout, with memristive synapses."""
